#[derive(clap::Args)]
pub struct RunArgs {}
pub fn run(_a: RunArgs) -> anyhow::Result<()> { Ok(()) }
