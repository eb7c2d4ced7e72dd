//! Empty on purpose: the library target lets `agent` name this crate as a build dependency,
//! so cargo rebuilds the embedded object when the probes change. The programs are the
//! `envelope-probes` binary (src/main.rs), built for the bpf target only.
#![no_std]
