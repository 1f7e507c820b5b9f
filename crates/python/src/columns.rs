//! Python columns to Arrow: what the Python package hands over (one entry
//! per feature, already picked out of a dict, a DataFrame or a Table) as one
//! [`RecordBatch`], for din's columnar reader to check and read like the
//! record batches of a Parquet file.
//!
//! Each column is one of:
//! * an object with the Arrow PyCapsule interface (`__arrow_c_array__`: a
//!   pyarrow `Array`), imported without copying;
//! * an object with the buffer protocol (a numpy array), 1-D (one value a
//!   row) or 2-D C-contiguous (a padded history, or a dense feature of
//!   dimension above 1, one row a row): wrapped without copying when its
//!   dtype is an Arrow type and its memory is aligned for it;
//! * `("ragged", values, offsets)`: a list per row, row `r` being
//!   `values[offsets[r]..offsets[r + 1]]` (lists of different lengths);
//! * a list of `str` (ids or histories written as text, `"12,7,3"`).

use std::panic::AssertUnwindSafe;
use std::ptr::NonNull;
use std::sync::Arc;

use arrow_array::ffi::{from_ffi, FFI_ArrowArray, FFI_ArrowSchema};
use arrow_array::types::{
    ArrowPrimitiveType, Float32Type, Float64Type, Int16Type, Int32Type, Int64Type, Int8Type, UInt16Type, UInt32Type,
    UInt64Type, UInt8Type,
};
use arrow_array::{make_array, Array, ArrayRef, BooleanArray, FixedSizeListArray, LargeListArray, PrimitiveArray};
use arrow_array::{RecordBatch, StringArray};
use arrow_buffer::{Buffer, OffsetBuffer, ScalarBuffer};
use arrow_schema::{Field, Schema};
use pyo3::buffer::{ElementType, PyUntypedBuffer};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyCapsule, PyCapsuleMethods, PyList, PyString, PyTuple};

/// A Python buffer kept alive (and held exported) for as long as an Arrow
/// buffer over its memory exists.
struct Held(#[allow(dead_code)] AssertUnwindSafe<PyUntypedBuffer>);

/// The columns `(name, object)` as one record batch; every column must have
/// `rows` rows. `source` names the container in errors (`x`, `y`, ...).
pub fn record_batch(py: Python<'_>, source: &str, columns: &[(String, Py<PyAny>)]) -> PyResult<RecordBatch> {
    let mut fields = Vec::with_capacity(columns.len());
    let mut arrays = Vec::with_capacity(columns.len());
    let mut first: Option<(&str, usize)> = None;
    for (name, obj) in columns {
        let array = column(py, source, name, obj.bind(py))?;
        match first {
            None => first = Some((name, array.len())),
            Some((other, n)) if n != array.len() => {
                return Err(PyValueError::new_err(format!(
                "{source}['{name}'] has {} rows, {source}['{other}'] has {n}: every feature needs one entry per sample",
                array.len()
            )))
            }
            Some(_) => {}
        }
        fields.push(Field::new(name, array.data_type().clone(), true));
        arrays.push(array);
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)
        .map_err(|e| PyValueError::new_err(format!("{source}: {e}")))
}

/// One column as an Arrow array.
fn column(py: Python<'_>, source: &str, name: &str, obj: &Bound<'_, PyAny>) -> PyResult<ArrayRef> {
    let what = || format!("{source}['{name}']");
    if obj.hasattr("__arrow_c_array__")? {
        return import_arrow(obj).map_err(|e| PyTypeError::new_err(format!("{}: {e}", what())));
    }
    if let Ok(t) = obj.cast::<PyTuple>() {
        if t.len() == 3 && t.get_item(0)?.extract::<String>().is_ok_and(|s| s == "ragged") {
            return ragged(py, &what(), &t.get_item(1)?, &t.get_item(2)?);
        }
    }
    if let Ok(list) = obj.cast::<PyList>() {
        if list.iter().all(|v| v.is_instance_of::<PyString>()) {
            let texts: Vec<String> = list.extract()?;
            return Ok(Arc::new(StringArray::from(texts)));
        }
    }
    let buffer = PyUntypedBuffer::get(obj).map_err(|_| {
        PyTypeError::new_err(format!(
            "{}: expected a numpy array, a pyarrow array or a list of strings, got {}",
            what(),
            obj.get_type().name().map_or_else(|_| "?".into(), |n| n.to_string())
        ))
    })?;
    from_buffer(&what(), buffer)
}

/// Imports an array through the Arrow C data interface (PyCapsules), which
/// moves it without copying its buffers.
fn import_arrow(obj: &Bound<'_, PyAny>) -> PyResult<ArrayRef> {
    let pair = obj.call_method0("__arrow_c_array__")?;
    let (schema, array): (Bound<'_, PyCapsule>, Bound<'_, PyCapsule>) = pair.extract()?;
    let schema_ptr = schema.pointer_checked(Some(c"arrow_schema"))?.cast::<FFI_ArrowSchema>();
    let array_ptr = array.pointer_checked(Some(c"arrow_array"))?.cast::<FFI_ArrowArray>();
    // SAFETY: the capsules are the producer's fresh export, named as the
    // Arrow PyCapsule interface names them, so they point at valid C data
    // interface structs. `from_raw` moves the array out (leaving a released
    // struct for the capsule's destructor); the schema is only borrowed and
    // the capsule frees it.
    let data = unsafe {
        let array = FFI_ArrowArray::from_raw(array_ptr.as_ptr());
        from_ffi(array, schema_ptr.as_ref())
    }
    .map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok(make_array(data))
}

/// `("ragged", values, offsets)`: one list per row.
fn ragged(py: Python<'_>, what: &str, values: &Bound<'_, PyAny>, offsets: &Bound<'_, PyAny>) -> PyResult<ArrayRef> {
    let values = from_buffer(&format!("{what} values"), PyUntypedBuffer::get(values)?)?;
    let offsets: Vec<i64> = {
        let b = PyUntypedBuffer::get(offsets)?;
        match ElementType::from_format(b.format()) {
            ElementType::SignedInteger { bytes: 8 } => b.into_typed::<i64>()?.to_vec(py)?,
            _ => return Err(PyTypeError::new_err(format!("{what}: the offsets must be int64"))),
        }
    };
    let ok = offsets.first().is_some_and(|&o| o >= 0)
        && offsets.windows(2).all(|w| w[0] <= w[1])
        && offsets.last().is_some_and(|&o| o as usize <= values.len());
    if !ok {
        return Err(PyValueError::new_err(format!(
            "{what}: the offsets must start at 0 or more, never decrease and end within the {} values",
            values.len()
        )));
    }
    let field = Arc::new(Field::new_list_field(values.data_type().clone(), false));
    let list = LargeListArray::try_new(field, OffsetBuffer::new(ScalarBuffer::from(offsets)), values, None)
        .map_err(|e| PyValueError::new_err(format!("{what}: {e}")))?;
    Ok(Arc::new(list))
}

/// A 1-D or 2-D C-contiguous buffer as a primitive array, or as a
/// fixed-size list per row.
fn from_buffer(what: &str, buffer: PyUntypedBuffer) -> PyResult<ArrayRef> {
    let shape = buffer.shape().to_vec();
    let width = match shape.len() {
        1 => None,
        2 => Some(shape[1]),
        d => {
            return Err(PyValueError::new_err(format!(
            "{what} has {d} dimensions (shape {shape:?}); give one value per sample (1-D) or one row per sample (2-D)"
        )))
        }
    };
    if !buffer.is_c_contiguous() {
        return Err(PyValueError::new_err(format!(
            "{what} is not C-contiguous (numpy.ascontiguousarray makes it so)"
        )));
    }
    let element = ElementType::from_format(buffer.format());
    let count = buffer.item_count();
    let values: ArrayRef = match element {
        ElementType::SignedInteger { bytes: 1 } => primitive::<Int8Type>(buffer, count),
        ElementType::SignedInteger { bytes: 2 } => primitive::<Int16Type>(buffer, count),
        ElementType::SignedInteger { bytes: 4 } => primitive::<Int32Type>(buffer, count),
        ElementType::SignedInteger { bytes: 8 } => primitive::<Int64Type>(buffer, count),
        ElementType::UnsignedInteger { bytes: 1 } => primitive::<UInt8Type>(buffer, count),
        ElementType::UnsignedInteger { bytes: 2 } => primitive::<UInt16Type>(buffer, count),
        ElementType::UnsignedInteger { bytes: 4 } => primitive::<UInt32Type>(buffer, count),
        ElementType::UnsignedInteger { bytes: 8 } => primitive::<UInt64Type>(buffer, count),
        ElementType::Float { bytes: 4 } => primitive::<Float32Type>(buffer, count),
        ElementType::Float { bytes: 8 } => primitive::<Float64Type>(buffer, count),
        ElementType::Bool => {
            let ptr = buffer.buf_ptr().cast::<u8>();
            // SAFETY: a C-contiguous buffer of `count` one-byte booleans.
            let bools: Vec<bool> = (0..count).map(|i| unsafe { *ptr.add(i) } != 0).collect();
            Arc::new(BooleanArray::from(bools))
        }
        _ => {
            return Err(PyTypeError::new_err(format!(
                "{what} has dtype format {:?}: din reads integers, float32/float64 and booleans (ids as integers, dense values as floats)",
                buffer.format()
            )))
        }
    };
    match width {
        None => Ok(values),
        Some(w) => {
            let width = i32::try_from(w).map_err(|_| PyValueError::new_err(format!("{what}: rows of {w} values")))?;
            let field = Arc::new(Field::new_list_field(values.data_type().clone(), false));
            let list = FixedSizeListArray::try_new(field, width, values, None)
                .map_err(|e| PyValueError::new_err(format!("{what}: {e}")))?;
            Ok(Arc::new(list))
        }
    }
}

/// The buffer's `count` values as an Arrow array over the same memory, or
/// a copy when the memory is not aligned for `T` (Arrow requires it).
fn primitive<T: ArrowPrimitiveType>(buffer: PyUntypedBuffer, count: usize) -> ArrayRef
where
    PrimitiveArray<T>: From<Vec<T::Native>>,
{
    let ptr = buffer.buf_ptr().cast::<u8>();
    let bytes = count * std::mem::size_of::<T::Native>();
    if count > 0 && !(ptr as usize).is_multiple_of(std::mem::align_of::<T::Native>()) {
        // SAFETY: the buffer is C-contiguous and holds `count` values of
        // `T::Native`'s size (its format says so); read unaligned.
        let values: Vec<T::Native> = (0..count)
            .map(|i| unsafe { std::ptr::read_unaligned(ptr.cast::<T::Native>().add(i)) })
            .collect();
        return Arc::new(PrimitiveArray::<T>::from(values));
    }
    let ptr = NonNull::new(ptr).unwrap_or(NonNull::dangling());
    // SAFETY: `ptr` points at `bytes` bytes of C-contiguous memory that the
    // exporter keeps valid until the buffer view `Held` owns is released,
    // which happens when the last Arrow reference to it is dropped. The
    // columns are read while the caller holds the GIL, so no Python code
    // writes to them meanwhile.
    let data = unsafe { Buffer::from_custom_allocation(ptr, bytes, Arc::new(Held(AssertUnwindSafe(buffer)))) };
    Arc::new(PrimitiveArray::<T>::new(ScalarBuffer::new(data, 0, count), None))
}
