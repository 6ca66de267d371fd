//! Model formats, NF4 quantization, kernels, architectures and tokenizers for ringlm.
//!
//! # Modules
//! - [`quant`]: weight formats. [`quant::nf4`] is bitsandbytes' NF4 with double-quantized scales, bit-exact.
//!
//! Still to come (see the issues): the GEMV/GEMM kernels over NF4 and BF16 weights, the thread pool, the
//! safetensors loader and the Yuan2 and Llama architectures.
#![deny(missing_docs)]

mod error;
pub mod quant;

pub use error::{Error, Result};
