#[derive(clap::Args)]
pub struct TestArgs {}
pub fn run(_a: TestArgs) -> anyhow::Result<()> { Ok(()) }
