//! The compiled backward's batch families (issue 16): one backward graph
//! seen at several batch sizes, and, once it has been fitted, the graph at
//! any other size without tracing.
//!
//! A backward has no forward to run again at a smaller size (the compiled
//! step traces its closure at `B - 1` and `B - 2` for that). At its first
//! size of 4 or more a family is fitted from the traced size and the
//! graph's shadows at `B - 1` and `B - 2` (`autograd::shadow`:
//! [`Family::from_shadows`]); otherwise, or once a guess from shadows is
//! taken back, it learns from the sizes the program meets: its first
//! three sizes are traced. Either way three graphs are fitted as a
//! function of the batch size ([`BatchModel`]), and so are the numbers of
//! their signatures (every dim, stride, offset and scalar the signature
//! shows). The batch size is the integer of the signatures that changes
//! least between the first two sizes.
//! A later size whose signature is the fitted one, number for number, is
//! that graph at its batch size: it is instantiated and lowered, not
//! traced. A signature the fit does not predict (a number that is not
//! affine in the batch size) is traced, as before. A batch of 1 is a size
//! range of its own, as in the compiled step (a broadcast dim may take
//! other formulas): it is traced, and not fitted. The signature decides
//! what the backward computes, so a predicted signature is the guard that
//! the instantiated graph is the one the formulas would trace, but for
//! what the formulas and the executor decide on sizes while tracing (a
//! contraction split past 16,384, a `min`, a dim of 0 or 1), which
//! `BatchModel::at` checks on the instantiated graph: such a size traces.
//! A first size whose graph differs from the next sizes' (a batch of 1)
//! is a family of its own: the next size starts another.

use crate::compiler::batch::{Affine, BatchModel, Scalar, fit_each, fit_int, fit_scalar};
use crate::compiler::ir::CapturedGraph;

/// A number of a signature's text: an integer or a float (as `{:?}`
/// writes it, which reads back to the same f64).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Number {
    Int(i64),
    Float(f64),
}

/// `text` with each of its numbers replaced by `#` (a number: a digit run,
/// with a fraction (`.` followed by a digit) and an exponent (`e`, an
/// optional sign and a digit) where one follows): the same for a graph at
/// every batch size, whichever way a scalar prints (`0.02`,
/// `6.103515625e-5`).
pub(crate) fn without_numbers(text: &str) -> String {
    split_numbers(text).0
}

/// [`without_numbers`] of `text` and the numbers it replaced, in order,
/// from one read of it (a batch family's key and its size's numbers).
pub(crate) fn split_numbers(text: &str) -> (String, Vec<Number>) {
    let spans = number_spans(text);
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for (span, _) in &spans {
        out.push_str(&text[at..span.start]);
        out.push('#');
        at = span.end;
    }
    out.push_str(&text[at..]);
    (out, spans.into_iter().map(|(_, n)| n).collect())
}

/// The numbers of `text` with where each is written.
fn number_spans(text: &str) -> Vec<(std::ops::Range<usize>, Number)> {
    let b = text.as_bytes();
    let digit = |i: usize| b.get(i).is_some_and(u8::is_ascii_digit);
    let digits_from = |mut i: usize| {
        while digit(i) {
            i += 1;
        }
        i
    };
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if !digit(i) {
            i += 1;
            continue;
        }
        let start = i;
        let mut float = false;
        i = digits_from(i);
        if b.get(i) == Some(&b'.') && digit(i + 1) {
            i = digits_from(i + 1);
            float = true;
        }
        if b.get(i) == Some(&b'e') {
            let sign = usize::from(matches!(b.get(i + 1), Some(b'-' | b'+')));
            if digit(i + 1 + sign) {
                i = digits_from(i + 1 + sign);
                float = true;
            }
        }
        let token = &text[start..i];
        let number = match (float, token.parse::<i64>()) {
            (false, Ok(n)) => Number::Int(n),
            _ => Number::Float(token.parse::<f64>().unwrap_or(f64::NAN)),
        };
        out.push((start..i, number));
    }
    out
}

/// A signature number as a function of the batch size.
#[derive(Debug, Clone, Copy)]
enum NumberFit {
    Int(Affine),
    /// The scalar's fit and its value at the first size.
    Float(Scalar, f64),
}

/// The family's graph and signature numbers as functions of the batch size.
#[derive(Debug)]
struct Model {
    /// Which signature number is the batch size.
    batch: usize,
    numbers: Vec<NumberFit>,
    graph: BatchModel,
}

/// One backward graph at the batch sizes it has met.
#[derive(Debug)]
pub(crate) struct Family {
    /// The graph at the first size: later sizes are fused against it (see
    /// [`crate::WgslCompiler`]).
    pub first: CapturedGraph,
    /// The first size's signature numbers.
    first_numbers: Vec<Number>,
    /// Whether the model was fitted at the first size from its shadows
    /// (`autograd::shadow`): a guess of which numbers follow the batch,
    /// which a size it does not predict takes back.
    guessed: bool,
    /// The traced sizes' signature numbers and graphs, until the model is fitted.
    seen: Vec<(Vec<Number>, CapturedGraph)>,
    model: Option<Model>,
    /// Why the traced sizes fit no model; every size then traces.
    pub unfit: Option<String>,
}

impl Family {
    pub fn new(numbers: Vec<Number>, graph: CapturedGraph) -> Family {
        Family {
            first: graph.clone(),
            first_numbers: numbers.clone(),
            guessed: false,
            seen: vec![(numbers, graph)],
            model: None,
            unfit: None,
        }
    }

    /// The family of a first size fitted with that size's shadows at two
    /// smaller sizes, or why they fit no model (every number is checked
    /// as for traced sizes). Returns the sizes fitted too.
    pub fn from_shadows(
        numbers: Vec<Number>,
        graph: CapturedGraph,
        shadows: Vec<(Vec<Number>, CapturedGraph)>,
    ) -> std::result::Result<(Family, [usize; 3]), String> {
        let mut family = Family::new(numbers, graph);
        let mut fitted = None;
        for (n, g) in shadows {
            fitted = family.observe(n, g);
        }
        let Some(sizes) = fitted else {
            return Err(family.unfit.unwrap_or_else(|| "two shadows that fit with it were not made".into()));
        };
        family.guessed = true;
        Ok((family, sizes))
    }

    /// The graph at batch size `b + 1`, from the model: what the program
    /// at `b` is fused against, so that every size gets the same kernels.
    pub fn twin(&self, b: usize) -> Option<CapturedGraph> {
        self.model.as_ref()?.graph.at(b + 1)
    }

    /// Whether a model guessed from shadows fails to predict the size
    /// whose signature has `numbers` (a batch of 2 or more: a batch of 1
    /// is a size range of its own, and proves nothing).
    pub fn mispredicts(&self, numbers: &[Number]) -> bool {
        let Some(model) = self.model.as_ref().filter(|_| self.guessed) else { return false };
        let big = matches!(numbers.get(model.batch), Some(&Number::Int(b)) if b >= 2);
        big && self.predicted_size(numbers).is_none()
    }

    /// Takes back a model guessed from shadows: the family learns from the
    /// sizes it traces, starting again from its first.
    pub fn forget_guess(&mut self) {
        *self = Family::new(self.first_numbers.clone(), self.first.clone());
    }

    /// Records a traced size; with the third, fits the model (or records
    /// why none fits). Returns the sizes once fitted.
    pub fn observe(&mut self, numbers: Vec<Number>, graph: CapturedGraph) -> Option<[usize; 3]> {
        if self.model.is_some() || self.unfit.is_some() || self.seen.iter().any(|(n, _)| *n == numbers) {
            return None;
        }
        self.seen.push((numbers, graph));
        if self.seen.len() < 3 {
            return None;
        }
        match fit(&self.seen) {
            Ok((model, sizes)) => {
                self.model = Some(model);
                self.seen.clear();
                Some(sizes)
            }
            // A batch of 1 is a size range of its own (broadcasting may
            // take other formulas there): it is not fitted, and the family
            // waits for another size.
            Err(Unfit::BatchOfOne(k)) => {
                self.seen.remove(k);
                None
            }
            Err(Unfit::Because(reason)) => {
                self.seen.clear();
                self.unfit = Some(reason);
                None
            }
        }
    }

    /// The batch size of the size whose signature has `numbers`, if the
    /// model predicts that signature exactly, with the graph there unless
    /// tracing would not give it (`BatchModel::at`: that size traces).
    pub fn instantiate(&self, numbers: &[Number]) -> Option<(usize, Option<CapturedGraph>)> {
        let model = self.model.as_ref()?;
        let b = self.predicted_size(numbers)?;
        Some((b, model.graph.at(b)))
    }

    /// The batch size of the signature with `numbers`, if the model
    /// predicts it exactly (2 or more).
    fn predicted_size(&self, numbers: &[Number]) -> Option<usize> {
        let model = self.model.as_ref()?;
        let Some(&Number::Int(b)) = numbers.get(model.batch) else { return None };
        // An empty batch and a batch of 1 trace: formulas may take another
        // path for an empty tensor or a broadcast dim.
        if numbers.len() != model.numbers.len() || b < 2 {
            return None;
        }
        let predicted = numbers.iter().zip(&model.numbers).all(|(n, fit)| match (n, fit) {
            (Number::Int(x), NumberFit::Int(f)) => f.at(b) == *x,
            (Number::Float(x), NumberFit::Float(f, first)) => f.at(b, *first).to_bits() == x.to_bits(),
            _ => false,
        });
        predicted.then_some(b as usize)
    }
}

/// Why three traced sizes give no model.
enum Unfit {
    /// Size `k` is a batch of 1: leave it out and wait for another.
    BatchOfOne(usize),
    /// No model fits; every size traces.
    Because(String),
}

/// Fits three traced sizes: the batch size is the integer that changes
/// least between the first two signatures.
fn fit(seen: &[(Vec<Number>, CapturedGraph)]) -> Result<(Model, [usize; 3]), Unfit> {
    let [(n0, g0), (n1, g1), (n2, g2)] = seen else { unreachable!("fit is called with three sizes") };
    if n0.len() != n1.len() || n0.len() != n2.len() {
        return Err(Unfit::Because("the signatures have different numbers of numbers".into()));
    }
    // The batch size changes by the least of the integers that change (a
    // numel `B * k` or a stride changes by a multiple of it); the first
    // such. Floats (a mean's 1 / B) are fitted as functions of it.
    let batch = n0
        .iter()
        .zip(n1)
        .enumerate()
        .filter_map(|(k, pair)| match pair {
            (Number::Int(a), Number::Int(b)) if a != b => Some((k, a.abs_diff(*b))),
            _ => None,
        })
        .min_by_key(|&(k, step)| (step, k))
        .map(|(k, _)| k)
        .ok_or_else(|| Unfit::Because("no integer changes between the first two sizes".into()))?;
    let size = |n: &[Number]| match n[batch] {
        Number::Int(b) if b >= 0 => Ok(b as usize),
        _ => Err(Unfit::Because("the number that changes least is not a size".into())),
    };
    let sizes = [size(n0)?, size(n1)?, size(n2)?];
    if let Some(k) = sizes.iter().position(|&b| b == 1) {
        return Err(Unfit::BatchOfOne(k));
    }
    if sizes[2] == sizes[0] || sizes[2] == sizes[1] {
        return Err(Unfit::Because(format!("the third size changed another number than the batch size ({sizes:?})")));
    }
    let numbers = fit_each(n0, n1, n2, |k, &[a, b, c]| {
        let fitted = match (a, b, c) {
            (Number::Int(x0), Number::Int(x1), Number::Int(x2)) => fit_int([x0, x1, x2], sizes).map(NumberFit::Int),
            (Number::Float(s0), Number::Float(s1), Number::Float(s2)) => {
                fit_scalar([s0, s1, s2], sizes).map(|f| NumberFit::Float(f, s0))
            }
            _ => None,
        };
        fitted.ok_or_else(|| {
            Unfit::Because(format!(
                "signature number {k} ({a:?}, {b:?}, {c:?} at batch sizes {sizes:?}) is not a form of the batch size"
            ))
        })
    })?;
    let graph = BatchModel::fit_at([(g0, sizes[0]), (g1, sizes[1]), (g2, sizes[2])]).map_err(Unfit::Because)?;
    Ok((Model { batch, numbers, graph }, sizes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_back_as_written() {
        let text = format!(
            "node 3 Binary {{ scalars: [Some({:?}), None] }} F32[10, 784] strides [784, 1] 1e-5 1.5e+3 x.y 2.",
            0.1f64
        );
        assert_eq!(
            split_numbers(&text).1,
            vec![
                Number::Int(3),
                Number::Float(0.1),
                Number::Int(32),
                Number::Int(10),
                Number::Int(784),
                Number::Int(784),
                Number::Int(1),
                Number::Float(1e-5),
                Number::Float(1.5e3),
                Number::Int(2),
            ]
        );
        // A mean's scalar at two sizes is two floats, not the digit runs
        // `0` and `01` of both.
        assert_ne!(split_numbers(&format!("{:?}", 0.01f64)).1, split_numbers(&format!("{:?}", 0.001f64)).1);
        // A scalar's text without its numbers is the same however it prints.
        let scalar = |v: f64| without_numbers(&format!("Some({v:?}) [B, 64]"));
        assert_eq!(scalar(0.02), scalar(1.0 / 16384.0));
        assert_eq!(scalar(0.02), "Some(#) [B, #]");
    }
}
