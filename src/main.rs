//! The `gpu-coordinator` command: parses the command line, loads the configuration, sets up logging and
//! signals, and hands over to the library (see [`cli`]). Errors are reported here with their context
//! (`anyhow`); nothing below this edge exits the process.

mod cli;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    cli::run().await
}
