//! Placeholder for the in-guest e2e runner; the harness lives in the library.
fn main() {
    println!("rthooks-e2e: the harness is a library (rthooks_e2e); the VM runner comes later");
}
