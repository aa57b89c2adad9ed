//! `pensieve_constraints`: the Python face of constrained decoding
//! (src/constrain.rs), registered in the embedded interpreter before the
//! shim is imported. The shim holds one [`PyMatcher`] per constrained
//! sequence and asks [`masks`] for a batch's token masks before sampling.

use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::constrain::SeqMatcher;

/// One sequence's grammar state (made on the engine thread from the
/// request's compiled grammar).
#[pyclass(name = "Matcher", module = "pensieve_constraints")]
pub struct PyMatcher {
    /// Taken out while a mask is computed without the GIL.
    inner: Option<SeqMatcher>,
}

impl PyMatcher {
    pub(crate) fn new(m: SeqMatcher) -> PyMatcher {
        PyMatcher { inner: Some(m) }
    }
}

/// The masks of one decode step: row i (`n_vocab` bytes, 1 = allowed) is
/// `matchers[i]`'s after it consumed `tokens[i]`; a row without a matcher
/// allows everything. Returns the rows as one bytes object and, per row,
/// the error that broke its grammar (its request then fails). Computed with
/// the GIL released.
#[pyfunction]
fn masks(
    py: Python<'_>,
    matchers: Vec<Option<Bound<'_, PyMatcher>>>,
    tokens: Vec<Vec<u32>>,
    n_vocab: usize,
) -> PyResult<(Py<PyBytes>, Vec<Option<String>>)> {
    if tokens.len() != matchers.len() {
        return Err(pyo3::exceptions::PyValueError::new_err("one token list per matcher"));
    }
    let mut taken: Vec<Option<SeqMatcher>> =
        matchers.iter().map(|m| m.as_ref().and_then(|m| m.borrow_mut().inner.take())).collect();
    let (rows, errors, taken) = py.detach(move || {
        let mut rows = vec![1u8; taken.len() * n_vocab];
        let mut errors = vec![None; taken.len()];
        for (i, (m, row)) in taken.iter_mut().zip(rows.chunks_mut(n_vocab.max(1))).enumerate() {
            let Some(m) = m else { continue };
            let t0 = std::time::Instant::now();
            if let Err(e) = m.advance_and_mask(&tokens[i], row) {
                row.fill(1);
                errors[i] = Some(e);
            }
            crate::metrics::constraint_mask(t0.elapsed().as_secs_f64());
        }
        (rows, errors, taken)
    });
    for (m, inner) in matchers.iter().zip(taken) {
        if let (Some(m), Some(inner)) = (m, inner) {
            m.borrow_mut().inner = Some(inner);
        }
    }
    Ok((PyBytes::new(py, &rows).unbind(), errors))
}

/// The module, to be put in `sys.modules`.
pub(crate) fn module(py: Python<'_>) -> PyResult<Bound<'_, PyModule>> {
    let m = PyModule::new(py, "pensieve_constraints")?;
    m.add_class::<PyMatcher>()?;
    m.add_function(wrap_pyfunction!(masks, &m)?)?;
    Ok(m)
}
