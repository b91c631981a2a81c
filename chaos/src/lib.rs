//! What the fault-injection suite shares with the end-to-end tests: reading the stack's data
//! directories byte for byte (the delete-on-ack canary scans of both).

pub mod data_files;
