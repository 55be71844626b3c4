//! BandSox-FS daemon library: FUSE layer, VM manager, VMM backends.
pub mod vmm;
