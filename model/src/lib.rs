//! Model formats, NF4 quantization, kernels, architectures and tokenizers for ringlm.
#![deny(missing_docs)]
