//! `kiln bench train` (filled in below).
use anyhow::Result;
use clap::Args;

#[derive(Args, Debug)]
pub struct BenchTrainArgs {}

pub fn run(_a: BenchTrainArgs) -> Result<()> {
    anyhow::bail!("not yet")
}
