//! Single-thread encode throughput on Shakespeare (placeholder).
fn main() {}
