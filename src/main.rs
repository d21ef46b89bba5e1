/// mimalloc rather than glibc malloc: the intake path allocates and frees per event,
/// and glibc's malloc/free took about a quarter of the server's CPU under load
/// (docs/performance.md, "Where the CPU goes").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    breakwater::cli::main()
}
