//! Empty on purpose: a library target lets `forwarder` declare this crate as a build-dependency,
//! so cargo re-runs aya-build when it changes. The programs are in `main.rs`.
#![no_std]
