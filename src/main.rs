fn main() {
    println!("ftpgate: not built yet");
}
