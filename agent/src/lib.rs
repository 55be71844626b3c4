//! `bandsox-agent`: the in-guest agent and the host<->agent wire protocol.
pub mod proto;
