//! `pensieve_kernels`: the Python face of the CPU kernels (src/kernels/),
//! registered in the embedded interpreter before the shim is imported.
//!
//! The shim's `cpu_kernels.py` repacks a model's quantized weights through
//! [`QuantMatrix`] (the Rust side owns them from then on) and hands
//! `table_address()` to the `pensieve_mlx` extension, whose MLX primitives
//! call the kernels from inside MLX's graph.

use std::sync::Arc;

use pyo3::buffer::{Element, PyBuffer};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::kernels::{self, ffi, quant};

/// A contiguous buffer's values (the buffer stays alive while borrowed).
fn values<'a, T: Element>(buf: &'a PyBuffer<T>, what: &str) -> PyResult<&'a [T]> {
    if !buf.is_c_contiguous() {
        return Err(PyValueError::new_err(format!("{what} must be contiguous")));
    }
    // SAFETY: a C-contiguous buffer of `item_count` elements of T (PyBuffer
    // checked the format), alive as long as `buf`, which the slice borrows;
    // nothing writes it while the kernels read (the engine thread holds it).
    Ok(unsafe { std::slice::from_raw_parts(buf.buf_ptr() as *const T, buf.item_count()) })
}

/// A quantized weight matrix, repacked for the CPU kernels.
#[pyclass(name = "QuantMatrix", module = "pensieve_kernels", frozen)]
pub struct PyQuantMatrix {
    inner: Arc<quant::QuantMatrix>,
}

#[pymethods]
impl PyQuantMatrix {
    /// From MLX's affine layout: `w` uint32 (rows, cols * bits / 32),
    /// `scales` and `biases` float32 (rows, cols / group_size).
    #[new]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        w: PyBuffer<u32>,
        scales: PyBuffer<f32>,
        biases: PyBuffer<f32>,
        rows: usize,
        cols: usize,
        bits: u32,
        group_size: usize,
    ) -> PyResult<Self> {
        let (w, s, b) = (values(&w, "w")?, values(&scales, "scales")?, values(&biases, "biases")?);
        let m =
            py.detach(|| quant::QuantMatrix::from_mlx(w, s, b, rows, cols, bits, group_size)).map_err(PyValueError::new_err)?;
        Ok(PyQuantMatrix { inner: Arc::new(m) })
    }

    /// The handle MLX primitives take (valid while this object lives; they
    /// take their own reference).
    #[getter]
    fn handle(&self) -> usize {
        ffi::handle(&self.inner)
    }
    #[getter]
    fn rows(&self) -> usize {
        self.inner.rows()
    }
    #[getter]
    fn cols(&self) -> usize {
        self.inner.cols()
    }
    #[getter]
    fn bits(&self) -> u32 {
        self.inner.bits()
    }
    #[getter]
    fn nbytes(&self) -> usize {
        self.inner.bytes()
    }
}

/// The address of the kernel table `pensieve_mlx.bind` takes.
#[pyfunction]
fn table_address() -> usize {
    ffi::table_address()
}

/// The instruction set the kernels run with here.
#[pyfunction]
fn isa() -> &'static str {
    kernels::Isa::best().name()
}

/// Threads the kernels use.
#[pyfunction]
fn threads() -> usize {
    kernels::threads()
}

/// {kernel: (calls, seconds)} since start.
#[pyfunction]
fn stats() -> std::collections::HashMap<&'static str, (u64, f64)> {
    use std::sync::atomic::Ordering::Relaxed;
    ffi::STAT_NAMES.iter().zip(&ffi::STATS).map(|(n, (c, ns))| (*n, (c.load(Relaxed), ns.load(Relaxed) as f64 / 1e9))).collect()
}

/// The module, to be put in `sys.modules`.
pub(crate) fn module(py: Python<'_>) -> PyResult<Bound<'_, PyModule>> {
    let m = PyModule::new(py, "pensieve_kernels")?;
    m.add_class::<PyQuantMatrix>()?;
    m.add_function(wrap_pyfunction!(table_address, &m)?)?;
    m.add_function(wrap_pyfunction!(isa, &m)?)?;
    m.add_function(wrap_pyfunction!(threads, &m)?)?;
    m.add_function(wrap_pyfunction!(stats, &m)?)?;
    Ok(m)
}
