//! `bandsox-agent`: the in-guest agent and the host<->agent wire protocol.
//!
//! * [`proto`]: message types and the frame codec.
//! * [`client`]: the host side (used by the daemon).
//! * [`server`]: the agent side: sessions, commands, flow control.
//! * [`reaper`]: the one child reaper of the process.
//! * [`init`]: PID 1 duties in the guest (mounts, modules, switch_root, power off).
//! * [`image`]: the image config (env, working dir, user) applied to every command.
pub mod client;
pub mod faults;
pub mod guestnet;
pub mod image;
pub mod init;
pub mod proto;
pub mod reaper;
pub mod server;
