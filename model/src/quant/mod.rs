//! Quantized weight formats.

pub mod nf4;
