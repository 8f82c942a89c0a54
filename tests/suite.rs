//! Every integration test, in one test binary: one link and one build of the shared
//! support code instead of one per file (the test build took half as long;
//! docs/development.md). The tests are grouped by the role they hold to account: the
//! proxy, the controller, the node agent, and what is shipped. `cargo test --test suite
//! proxy::` runs a group, `cargo test --test suite proxy::faults::` one area.

mod common;

mod controller;
mod node_agent;
mod proxy;
mod shipped;
