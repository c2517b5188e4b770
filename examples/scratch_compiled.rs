use wgrad::{Device, Tensor, WgslCompiler};
fn main() -> wgrad::Result<()> {
    let device = Device::new()?;
    let n = 1024;
    let x = Tensor::rand([n], 1, &device)?.requires_grad(true)?;
    let a = Tensor::rand([n], 2, &device)?.requires_grad(true)?;
    let b = Tensor::rand([n], 3, &device)?.requires_grad(true)?;
    let f = |x: &Tensor, a: &Tensor, b: &Tensor| -> wgrad::Result<Tensor> {
        x.mul(a)?.add(b)?.tanh()?.mul(&x.sigmoid()?)?.add(&x.mul(x)?.neg()?.exp()?)?.sum_all()
    };
    f(&x, &a, &b)?.backward()?;
    let eager: Vec<Vec<f32>> = [&x, &a, &b].iter().map(|t| t.grad().unwrap().to_vec::<f32>().unwrap()).collect();
    for t in [&x, &a, &b] {
        t.zero_grad();
    }
    let guard = WgslCompiler::install(&device)?;
    for _ in 0..2 {
        for t in [&x, &a, &b] {
            t.zero_grad();
        }
        f(&x, &a, &b)?.backward()?;
    }
    let compiled: Vec<Vec<f32>> = [&x, &a, &b].iter().map(|t| t.grad().unwrap().to_vec::<f32>().unwrap()).collect();
    let maxdiff =
        eager.iter().flatten().zip(compiled.iter().flatten()).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    println!("max diff {maxdiff} stats {:?}", guard.stats());
    Ok(())
}
