use wgrad::{Device, Tensor, WgslCompiler};
fn main() -> wgrad::Result<()> {
    let device = Device::new()?;
    let _g = WgslCompiler::install(&device)?;
    let x = Tensor::rand([8, 5], 1, &device)?;
    let w = Tensor::rand([5, 3], 2, &device)?.requires_grad(true)?;
    let b = Tensor::rand([3], 3, &device)?.requires_grad(true)?;
    let loss = x.matmul(&w)?.add(&b)?.relu()?.square()?.sum_all()?;
    loss.backward()?;
    Ok(())
}
