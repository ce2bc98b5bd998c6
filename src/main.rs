fn main() -> std::process::ExitCode {
    ffnskip::cli::main()
}
