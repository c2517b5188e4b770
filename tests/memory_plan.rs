//! The compiled step's whole-program memory plan and multi-output matmul
//! epilogues against eager mode: intermediates whose sum exceeds what one
//! binding may span (the plan splits its buffers), a square MLP, and a
//! parameter that is an operand of its own gradient's matmul (its update
//! cannot be stored in place there). Run also with `WGRAD_MATMUL=tiled`
//! (epilogues on) by `scripts/test.sh`.

mod common;
use common::device;
use wgrad::{Optimizer, Result, Sgd, Tensor, compile_step};

fn close(what: &str, g: &[f32], w: &[f32], tol: f32) {
    assert_eq!(g.len(), w.len());
    let s = w.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    for (i, (a, b)) in g.iter().zip(w).enumerate() {
        assert!((a - b).abs() <= tol * s || (a.is_nan() && b.is_nan()), "{what}[{i}]: compiled {a} vs eager {b}");
    }
}

fn mlp_step(rows: usize, width: usize, layers: usize, steps: usize, tol: f32) {
    let d = device();
    let mk = |seed: u64| -> Vec<Tensor> {
        (0..layers)
            .map(|l| {
                wgrad::nn::uniform([width, width], 0.5, seed + l as u64, &d)
                    .unwrap()
                    .detach()
                    .requires_grad(true)
                    .unwrap()
            })
            .collect()
    };
    let (pe, pc) = (mk(1), mk(1));
    let body = |ps: &[Tensor], opt: &mut Sgd, x: &Tensor| -> Result<Vec<Tensor>> {
        opt.zero_grad();
        let mut h = x.clone();
        for w in ps {
            h = h.matmul(w)?.tanh()?;
        }
        let l = h.square()?.sum_all()?;
        l.backward()?;
        opt.step()?;
        Ok(vec![l])
    };
    let mut oe = Sgd::new(&pe, 0.01, 0.0, 0.0).unwrap();
    let mut oc = Sgd::new(&pc, 0.01, 0.0, 0.0).unwrap();
    let pc2 = pc.clone();
    let mut step = compile_step(&d, move |a: &[Tensor]| body(&pc2, &mut oc, &a[0]));
    for i in 0..steps {
        let x = wgrad::nn::uniform([rows, width], 1.0, 100 + i as u64, &d).unwrap().detach();
        let want = body(&pe, &mut oe, &x).unwrap();
        let got = step.call(&[x]).unwrap();
        close("loss", &got[0].to_vec::<f32>().unwrap(), &want[0].to_vec::<f32>().unwrap(), tol);
        for (k, (c, e)) in pc.iter().zip(&pe).enumerate() {
            close(&format!("step {i} param {k}"), &c.to_vec::<f32>().unwrap(), &e.to_vec::<f32>().unwrap(), tol);
        }
    }
    eprintln!("{:?}", step.stats());
}

/// Intermediates that each fit a binding but whose sum does not (webgpu limits: 128 MiB).
#[test]
fn large_program_arena() {
    mlp_step(1 << 21, 4, 4, 2, 1e-4);
}

#[test]
fn small_mlp_square() {
    mlp_step(64, 64, 3, 3, 1e-4);
}

/// Square parameter that is an operand of its own gradient's matmul, and batched/transposed.
#[test]
fn param_operand_of_own_grad_matmul() {
    let d = device();
    let n = 70;
    let mk = || wgrad::nn::uniform([n, n], 0.3, 9, &d).unwrap().detach().requires_grad(true).unwrap();
    let (we, wc) = (mk(), mk());
    let body = |w: &Tensor, opt: &mut Sgd, x: &Tensor| -> Result<Vec<Tensor>> {
        opt.zero_grad();
        let l = w.matmul(w)?.matmul(x)?.tanh()?.add(&x.transpose(0, 1)?.matmul(&w.transpose(0, 1)?)?)?.sum_all()?;
        l.backward()?;
        opt.step()?;
        Ok(vec![l])
    };
    let mut oe = Sgd::new(std::slice::from_ref(&we), 0.01, 0.0, 0.0).unwrap();
    let mut oc = Sgd::new(std::slice::from_ref(&wc), 0.01, 0.0, 0.0).unwrap();
    let w2 = wc.clone();
    let mut step = compile_step(&d, move |a: &[Tensor]| body(&w2, &mut oc, &a[0]));
    for i in 0..3 {
        let x = wgrad::nn::uniform([n, n], 1.0, 50 + i, &d).unwrap().detach();
        let want = body(&we, &mut oe, &x).unwrap();
        let got = step.call(&[x]).unwrap();
        close("loss", &got[0].to_vec::<f32>().unwrap(), &want[0].to_vec::<f32>().unwrap(), 1e-4);
        close(&format!("w {i}"), &wc.to_vec::<f32>().unwrap(), &we.to_vec::<f32>().unwrap(), 1e-4);
        close(
            &format!("grad {i}"),
            &wc.grad().unwrap().to_vec::<f32>().unwrap(),
            &we.grad().unwrap().to_vec::<f32>().unwrap(),
            1e-4,
        );
    }
}
