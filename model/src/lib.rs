//! Model formats, NF4 quantization, kernels, architectures and tokenizers for ringlm.
//!
//! # Modules
//! - [`quant`]: weight formats. [`quant::nf4`] is bitsandbytes' NF4 with double-quantized scales, bit-exact.
//! - [`kernels`]: GEMV (decode) and GEMM (prefill) over NF4 and BF16 weights, each with a scalar reference
//!   and SIMD versions (AVX-512, AVX2) chosen at run time.
//! - [`pool`]: the persistent, pinned thread pool the kernels run on.
//! - [`weight`]: a linear layer's weight in f32, NF4 or bf16, and how it is split over ranks.
//! - [`shards`]: per-rank shard files and their manifest (what `ringlm convert` writes).
//! - [`gguf`]: llama.cpp's GGUF files (F32, F16, BF16, Q8_0, Q4_0, Q4_1), bounds-checked.
//! - [`hf`]: Hugging Face checkpoints (safetensors, sharded or not), memory-mapped.
//! - [`tokenizer`]: Yuan 2.0's SentencePiece tokenizer and the byte-level BPE of GGUF models, in pure Rust.
//! - [`arch`]: one decoder ([`arch::Model`]) for Yuan 2.0 (with its LFA convolutions) and the Llama family,
//!   tensor-parallel and pipelined; loading, converting and random models of real shapes.
//! - [`rng`]: the seeded generator behind random weights and sampling.
#![deny(missing_docs)]
// Slicing APIs take lists of column ranges; a list of one range is the common case, not a mistake.
#![allow(clippy::single_range_in_vec_init)]

pub mod arch;
mod error;
pub mod gguf;
pub mod hf;
pub mod kernels;
pub mod pool;
pub mod quant;
pub mod rng;
pub mod shards;
pub mod tokenizer;
pub mod weight;

pub use error::{Error, Result};
