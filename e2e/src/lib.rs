//! End-to-end test support for rthooks: harnesses that drive real runtimes.
