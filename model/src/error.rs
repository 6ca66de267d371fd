use std::fmt;

/// Errors of the model crate; the `With*` variants wrap context around an inner error.
#[derive(Debug)]
pub enum Error {
    /// An I/O error.
    Io(std::io::Error),
    /// A shape or length that does not fit.
    Shape(String),
    /// Input that is not what the format says (corrupt, truncated, unsupported).
    Format(String),
    /// The error concerns this file.
    WithFile {
        /// The file.
        path: std::path::PathBuf,
        /// The inner error.
        err: Box<Error>,
    },
    /// The error concerns this tensor.
    WithTensor {
        /// The tensor's name.
        name: String,
        /// The inner error.
        err: Box<Error>,
    },
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wraps the error with a tensor name.
    pub fn tensor(self, name: impl Into<String>) -> Error {
        Error::WithTensor {
            name: name.into(),
            err: Box::new(self),
        }
    }

    /// Wraps the error with a file path.
    pub fn file(self, path: impl Into<std::path::PathBuf>) -> Error {
        Error::WithFile {
            path: path.into(),
            err: Box::new(self),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(e) => write!(f, "{e}"),
            Error::Shape(m) | Error::Format(m) => f.write_str(m),
            Error::WithFile { path, err } => write!(f, "{}: {err}", path.display()),
            Error::WithTensor { name, err } => write!(f, "tensor {name}: {err}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Error {
        Error::Io(e)
    }
}
