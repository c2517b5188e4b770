//! [`CompilerInterface`] and [`CompilerGuard`]: one compiler for the whole
//! process, installed and uninstalled by RAII, as PyTorch's compiled
//! autograd does with `PyCompilerGuard`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::RwLock;

use crate::compiler::ir::CapturedGraph;
use crate::compiler::runtime::Program;
use crate::compiler::signature::Signature;
use crate::device::Device;
use crate::error::{Error, Result};

/// Counters of a compiler since it was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompilerStats {
    /// Backward calls that walked the graph in capture mode.
    pub captures: u64,
    /// Captures whose signature was cached: replayed without tracing.
    pub cache_hits: u64,
    /// Captures whose signature was not cached: a new program, traced (or,
    /// for a new size of a fitted batch family, instantiated: `replans`),
    /// optimised and lowered.
    pub cache_misses: u64,
    /// Cache misses that were a graph compiled before at another batch size
    /// (the same graph but for its numbers): fused to the same kernels as
    /// that size, so a new batch size creates no pipeline (see
    /// [`crate::WgslCompiler`]).
    pub new_sizes: u64,
    /// New sizes whose graph was instantiated from the batch family's fit
    /// (of the first size and its shadows, or of three traced sizes)
    /// instead of traced: the backward formulas did not run. Traces are
    /// `cache_misses - replans`.
    pub replans: u64,
    /// Graphs whose batch family was fitted at their first size, from
    /// the traced size and its shadows at two smaller sizes (the graph
    /// made at those sizes from its nodes, traced without buffers): their
    /// later sizes are instantiated where the fit predicts them.
    pub shadow_fits: u64,
    /// Backward calls that ran eagerly although the compiler was installed
    /// (e.g. `create_graph`); the log says why.
    pub fallbacks: u64,
    /// Replays of compiled programs.
    pub replays: u64,
    /// Kernel dispatches of the most recent replay.
    pub kernels_last_replay: u64,
    /// IR ops that were fused into another op's kernel instead of getting one
    /// of their own, summed over all compiled programs.
    pub ops_fused: u64,
    /// Pipelines the device created while this compiler lowered programs.
    pub pipelines_created: u64,
}

/// The calls the engine makes while it walks a backward graph in capture
/// mode, and the lowering of the captured graph. [`crate::WgslCompiler`] is
/// the implementation that lowers to fused WGSL; implement this to wrap it
/// (e.g. to count or log) or to lower differently.
pub trait CompilerInterface: Send + Sync {
    /// The device the compiler's programs run on; a backward on another
    /// device runs eagerly.
    fn device(&self) -> &Device;
    /// Called at the start of every compiled backward, once the graph's
    /// signature is built: the cached program for it, if any (or one
    /// built without a trace, as [`crate::WgslCompiler`] does for a new
    /// size of a graph whose batch family it has fitted).
    fn lookup(&self, signature: &Signature) -> Option<Arc<Program>>;
    /// Called on a cache miss with the graph the backward formulas traced
    /// into: optimise, lower and cache it.
    fn compile(&self, signature: &Signature, graph: CapturedGraph) -> Result<Arc<Program>>;
    /// [`CompilerInterface::compile`], with the same backward at two
    /// smaller batch sizes (their signatures and graphs, traced from the
    /// graph's shadow at those sizes, or none where no shadow could be
    /// made) a call of `smaller` away. [`crate::WgslCompiler`] asks for
    /// them at a graph's first size, to fit its batch family there;
    /// by default they are not asked for.
    fn compile_with_sizes(
        &self,
        signature: &Signature,
        graph: CapturedGraph,
        smaller: &mut dyn FnMut() -> Vec<(Signature, CapturedGraph)>,
    ) -> Result<Arc<Program>> {
        let _ = smaller;
        self.compile(signature, graph)
    }
    /// Called when a backward runs eagerly although this compiler is installed.
    fn fallback(&self, reason: &str);
    /// Called after every replay of `program`.
    fn replayed(&self, program: &Program);
    /// The compiler's counters.
    fn stats(&self) -> CompilerStats;
}

type Active = Option<(u64, Arc<dyn CompilerInterface>)>;

static ACTIVE: RwLock<Active> = RwLock::new(None);
static NEXT_GUARD: AtomicU64 = AtomicU64::new(1);

/// Keeps a compiler installed for the whole process while it lives; every
/// `backward()`, `backward_with()` and [`crate::grad`] is compiled
/// meanwhile. Dropping it uninstalls the compiler; a backward already
/// running keeps its own handle and finishes normally.
///
/// ```
/// # use wgrad::{CompilerGuard, Device, Error, Tensor, WgslCompiler};
/// # let device = Device::new()?;
/// let guard = CompilerGuard::install(WgslCompiler::new(&device))?;
/// assert!(matches!(CompilerGuard::install(WgslCompiler::new(&device)), Err(Error::CompilerAlreadyActive)));
/// drop(guard);
/// assert!(matches!(CompilerGuard::active(), Err(Error::NoActiveCompiler)));
/// # Ok::<(), wgrad::Error>(())
/// ```
pub struct CompilerGuard {
    id: u64,
    compiler: Arc<dyn CompilerInterface>,
}

impl CompilerGuard {
    /// Installs `compiler`; `Err(CompilerAlreadyActive)` if one is installed.
    /// When threads race to install, exactly one wins.
    pub fn install(compiler: impl CompilerInterface + 'static) -> Result<CompilerGuard> {
        CompilerGuard::install_arc(Arc::new(compiler))
    }

    /// Like [`CompilerGuard::install`], for a compiler you keep a handle to.
    pub fn install_arc(compiler: Arc<dyn CompilerInterface>) -> Result<CompilerGuard> {
        let mut active = ACTIVE.write();
        if active.is_some() {
            return Err(Error::CompilerAlreadyActive);
        }
        let id = NEXT_GUARD.fetch_add(1, Ordering::Relaxed);
        *active = Some((id, compiler.clone()));
        Ok(CompilerGuard { id, compiler })
    }

    /// The installed compiler; `Err(NoActiveCompiler)` if none is.
    pub fn active() -> Result<Arc<dyn CompilerInterface>> {
        active_compiler().ok_or(Error::NoActiveCompiler)
    }

    /// The compiler this guard installed.
    pub fn compiler(&self) -> &Arc<dyn CompilerInterface> {
        &self.compiler
    }

    /// Shorthand for `self.compiler().stats()`.
    pub fn stats(&self) -> CompilerStats {
        self.compiler.stats()
    }
}

impl Drop for CompilerGuard {
    fn drop(&mut self) {
        let mut active = ACTIVE.write();
        if active.as_ref().is_some_and(|(id, _)| *id == self.id) {
            *active = None;
        }
    }
}

pub(crate) fn active_compiler() -> Option<Arc<dyn CompilerInterface>> {
    ACTIVE.read().as_ref().map(|(_, c)| c.clone())
}
