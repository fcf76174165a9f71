//! How far a candidate's outputs are from the baseline's on the same inputs, and the bound a
//! candidate must stay within to be timed at all.
//!
//! Three figures per candidate, over every output element of every calibration request:
//! - the largest absolute difference;
//! - the largest relative difference, `|candidate - baseline| / max(|baseline|, 1e-3)` (the
//!   floor keeps values near zero from reading as huge relative errors);
//! - for classifier-like outputs (floating point, at least two dimensions, more than one class
//!   on the last axis) the share of rows whose top-1 class is the same (a row is every position
//!   of the leading axes).
//!
//! Integer, boolean and string outputs must match exactly: any difference rejects.

use serde::Serialize;

use crate::serving::tensor::{DataType, Payload, Tensor};

/// Smallest magnitude relative differences are taken against.
pub const RELATIVE_FLOOR: f64 = 1e-3;

/// A candidate's distance from the baseline.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Agreement {
    /// Largest `|candidate - baseline|`.
    pub max_abs_error: f64,
    /// Largest `|candidate - baseline| / max(|baseline|, 1e-3)`.
    pub max_rel_error: f64,
    /// Share of classifier rows whose top-1 class agrees (1.0 = all); `None` when no output
    /// looks like a classifier.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top1_agreement: Option<f64>,
    /// Output elements compared.
    pub elements: usize,
    /// Why an exact output (integers, booleans, strings) differs, if one does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exact_mismatch: Option<String>,
}

/// The most a candidate may lose. Unset limits do not apply; a candidate whose exact outputs
/// differ is always rejected.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Bound {
    /// Largest absolute error allowed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_abs_error: Option<f64>,
    /// Largest relative error allowed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_rel_error: Option<f64>,
    /// Largest share of classifier rows allowed to change their top-1 class (the CLI's
    /// `--max-accuracy-loss`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_top1_loss: Option<f64>,
}

impl Bound {
    /// Ok when `a` is within every limit; else which limit, with both figures.
    pub fn check(&self, a: &Agreement) -> Result<(), String> {
        if let Some(why) = &a.exact_mismatch {
            return Err(format!("exact outputs differ: {why}"));
        }
        if let Some(max) = self.max_abs_error
            && a.max_abs_error > max
        {
            return Err(format!(
                "absolute error {:.3e} is over the bound {max:.3e}",
                a.max_abs_error
            ));
        }
        if let Some(max) = self.max_rel_error
            && a.max_rel_error > max
        {
            return Err(format!(
                "relative error {:.3e} is over the bound {max:.3e}",
                a.max_rel_error
            ));
        }
        if let (Some(max), Some(agree)) = (self.max_top1_loss, a.top1_agreement)
            && 1.0 - agree > max + 1e-12
        {
            return Err(format!(
                "top-1 agreement {:.2} % loses {:.2} % of rows, over the bound {:.2} %",
                agree * 100.0,
                (1.0 - agree) * 100.0,
                max * 100.0
            ));
        }
        Ok(())
    }
}

/// Compares a candidate's outputs with the baseline's, request by request (outputs in
/// signature order). Fails when the shapes or types differ: that is not a candidate at all.
pub fn compare(baseline: &[Vec<Tensor>], candidate: &[Vec<Tensor>]) -> Result<Agreement, String> {
    if baseline.len() != candidate.len() {
        return Err(format!("{} answers against {}", candidate.len(), baseline.len()));
    }
    let mut a = Agreement::default();
    let (mut rows, mut agreeing) = (0usize, 0usize);
    for (r, (want, got)) in baseline.iter().zip(candidate).enumerate() {
        if want.len() != got.len() {
            return Err(format!("request {r}: {} outputs against {}", got.len(), want.len()));
        }
        for (i, (x, y)) in want.iter().zip(got).enumerate() {
            if x.shape() != y.shape() || x.dtype() != y.dtype() {
                return Err(format!(
                    "request {r} output {i}: {} {:?} against {} {:?}",
                    y.dtype(),
                    y.shape(),
                    x.dtype(),
                    x.shape()
                ));
            }
            a.elements += x.shape().iter().product::<usize>();
            let float = matches!(x.dtype(), DataType::F16 | DataType::F32 | DataType::F64);
            if !float {
                let same = match (x.payload(), y.payload()) {
                    (Payload::Strings(p), Payload::Strings(q)) => p == q,
                    _ => x.to_f64() == y.to_f64(),
                };
                if !same && a.exact_mismatch.is_none() {
                    a.exact_mismatch = Some(format!("request {r} output {i} ({})", x.dtype()));
                }
                continue;
            }
            let (xs, ys) = (x.to_f64(), y.to_f64());
            for (p, q) in xs.iter().zip(&ys) {
                let d = (p - q).abs();
                let d = if d.is_nan() {
                    if p.is_nan() && q.is_nan() { 0.0 } else { f64::INFINITY }
                } else {
                    d
                };
                let d = if p == q { 0.0 } else { d };
                a.max_abs_error = a.max_abs_error.max(d);
                a.max_rel_error = a.max_rel_error.max(d / p.abs().max(RELATIVE_FLOOR));
            }
            let classes = x.shape().last().copied().unwrap_or(0);
            if x.shape().len() >= 2 && classes > 1 {
                for (p, q) in xs.chunks_exact(classes).zip(ys.chunks_exact(classes)) {
                    rows += 1;
                    agreeing += usize::from(argmax(p) == argmax(q));
                }
            }
        }
    }
    if rows > 0 {
        a.top1_agreement = Some(agreeing as f64 / rows as f64);
    }
    Ok(a)
}

fn argmax(row: &[f64]) -> usize {
    let mut best = 0;
    for (i, v) in row.iter().enumerate() {
        if *v > row[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scores(rows: &[[f32; 3]]) -> Tensor {
        let bytes = rows.iter().flatten().flat_map(|v| v.to_le_bytes()).collect();
        Tensor::from_bytes(DataType::F32, vec![rows.len(), 3], bytes).expect("tensor")
    }

    #[test]
    fn figures_are_the_largest_differences_and_the_top1_share() {
        let base = vec![vec![scores(&[[0.1, 0.7, 0.2], [0.5, 0.3, 0.2]])]];
        let near = vec![vec![scores(&[[0.1, 0.69, 0.2], [0.5, 0.3, 0.2]])]];
        let a = compare(&base, &near).expect("comparable");
        assert!((a.max_abs_error - 0.01).abs() < 1e-6, "{a:?}");
        assert!((a.max_rel_error - 0.01 / 0.7).abs() < 1e-5, "{a:?}");
        assert_eq!(a.top1_agreement, Some(1.0));
        assert_eq!(a.elements, 6);
        // The second row's class flips: half the rows disagree.
        let flipped = vec![vec![scores(&[[0.1, 0.7, 0.2], [0.3, 0.5, 0.2]])]];
        let b = compare(&base, &flipped).expect("comparable");
        assert_eq!(b.top1_agreement, Some(0.5));
        let bound = Bound { max_top1_loss: Some(0.01), ..Bound::default() };
        assert!(bound.check(&a).is_ok());
        let why = bound.check(&b).expect_err("over the bound");
        assert!(why.contains("top-1 agreement 50.00 %"), "{why}");
        let tight = Bound { max_abs_error: Some(1e-3), ..Bound::default() };
        assert!(tight.check(&a).expect_err("abs").contains("absolute error"));
    }

    #[test]
    fn exact_outputs_must_match_and_shapes_must_agree() {
        let ints = |v: &[i64]| {
            let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            Tensor::from_bytes(DataType::I64, vec![v.len()], bytes).expect("ints")
        };
        let a = compare(&[vec![ints(&[1, 2])]], &[vec![ints(&[1, 3])]]).expect("comparable");
        assert!(Bound::default().check(&a).expect_err("exact").contains("exact outputs differ"));
        assert!(compare(&[vec![ints(&[1, 2])]], &[vec![ints(&[1])]]).is_err());
        let nan = vec![vec![scores(&[[f32::NAN, 0.0, 0.0]])]];
        let num = vec![vec![scores(&[[0.0, 0.0, 0.0]])]];
        assert_eq!(compare(&nan, &nan).expect("same").max_abs_error, 0.0);
        assert!(compare(&nan, &num).expect("comparable").max_abs_error.is_infinite());
    }
}
