//! QEMU microvm backend.
