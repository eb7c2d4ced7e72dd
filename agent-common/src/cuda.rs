//! CUDA calls seen through uprobes on the CUDA runtime (`libcudart.so*`) and driver
//! (`libcuda.so*`) libraries: which functions are probed, what each one means, and the map
//! records the probes write.
//!
//! One entry program and one return program serve every function. What a function is (a
//! synchronisation, a copy in some direction, an allocation, a launch) and where its byte
//! count is travel in the attach cookie (`bpf_get_attach_cookie`, Linux 5.15), built by
//! [`cookie`] from [`FUNCTIONS`] and read back by [`Cookie`]: adding a function is one line
//! in the table, no new program.

/// What a call does, for the probes.
pub mod call {
    /// Blocks until the GPU has finished work (`cudaStreamSynchronize`...).
    pub const SYNC: u8 = 1;
    /// A copy that returns when the bytes have moved (`cudaMemcpy`): blocks the thread.
    pub const COPY: u8 = 2;
    /// A copy queued on a stream (`cudaMemcpyAsync`): its bytes count, its time shows in
    /// the synchronisation that waits for it.
    pub const COPY_ASYNC: u8 = 3;
    /// Device memory allocation: bytes when it succeeds, a failure otherwise.
    pub const ALLOC: u8 = 4;
    /// A kernel launch (only probed in "sync+launch" mode: a busy model launches tens of
    /// thousands per second).
    pub const LAUNCH: u8 = 5;

    /// Whether the calling thread waits on the GPU for the call's duration.
    #[inline(always)]
    pub const fn blocks(call: u8) -> bool {
        call == SYNC || call == COPY
    }
}

/// Copy directions (also the `direction` of a [`CudaCallKey`]).
pub mod direction {
    pub const HOST_TO_DEVICE: u8 = 0;
    pub const DEVICE_TO_HOST: u8 = 1;
    /// Device to device on one GPU (or between two, when the call does not say).
    pub const DEVICE_TO_DEVICE: u8 = 2;
    /// Host to host, or `cudaMemcpyDefault` (the runtime infers it from the pointers, which
    /// the probe does not look up), or not a copy.
    pub const OTHER: u8 = 3;
    /// Between two GPUs (`cudaMemcpyPeer`, `cuMemcpyPeer`).
    pub const PEER: u8 = 4;
    /// Not a direction: the runtime's `cudaMemcpyKind` argument says it (see
    /// [`from_memcpy_kind`]).
    pub const FROM_KIND_ARGUMENT: u8 = 5;

    /// The direction of a `cudaMemcpyKind`.
    #[inline(always)]
    pub const fn from_memcpy_kind(kind: u64) -> u8 {
        match kind & 0xffff_ffff {
            1 => HOST_TO_DEVICE,
            2 => DEVICE_TO_HOST,
            3 => DEVICE_TO_DEVICE,
            _ => OTHER,
        }
    }
}

/// Which library a function lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Library {
    /// `libcudart.so*`: the runtime API (`cuda*`).
    Runtime,
    /// `libcuda.so*`: the driver API (`cu*`); the runtime calls into it.
    Driver,
}

/// No argument holds the byte count.
pub const NO_ARGUMENT: u8 = 0xff;

/// One probed function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Function {
    pub library: Library,
    pub symbol: &'static str,
    /// `call::*`.
    pub call: u8,
    /// The argument (0-based, at most 5: the ones in registers) with the byte count, or
    /// [`NO_ARGUMENT`].
    pub bytes_argument: u8,
    /// `direction::*`; `FROM_KIND_ARGUMENT` reads it from `kind_argument`.
    pub direction: u8,
    pub kind_argument: u8,
}

const fn function(
    library: Library,
    symbol: &'static str,
    call: u8,
    bytes_argument: u8,
    direction: u8,
    kind_argument: u8,
) -> Function {
    Function {
        library,
        symbol,
        call,
        bytes_argument,
        direction,
        kind_argument,
    }
}

const fn sync(library: Library, symbol: &'static str) -> Function {
    function(
        library,
        symbol,
        call::SYNC,
        NO_ARGUMENT,
        direction::OTHER,
        0,
    )
}

const fn copy(library: Library, symbol: &'static str, call: u8, bytes: u8, to: u8) -> Function {
    function(library, symbol, call, bytes, to, 0)
}

/// A runtime `cudaMemcpy*(dst, src, count, kind, ...)`: direction from its kind.
const fn runtime_copy(symbol: &'static str, call: u8) -> Function {
    function(
        Library::Runtime,
        symbol,
        call,
        2,
        direction::FROM_KIND_ARGUMENT,
        3,
    )
}

const fn alloc(library: Library, symbol: &'static str) -> Function {
    function(library, symbol, call::ALLOC, 1, direction::OTHER, 0)
}

const fn launch(library: Library, symbol: &'static str) -> Function {
    function(
        library,
        symbol,
        call::LAUNCH,
        NO_ARGUMENT,
        direction::OTHER,
        0,
    )
}

use Library::{Driver, Runtime};
use call::{COPY, COPY_ASYNC};
use direction::{DEVICE_TO_DEVICE, DEVICE_TO_HOST, HOST_TO_DEVICE, OTHER, PEER};

/// Every function the probes attach to, where the library has it. The `_ptsz`/`_ptds`
/// variants are what code built with `--default-stream per-thread` calls. The index in this
/// table is the function's id in the maps, so entries are only ever appended.
pub const FUNCTIONS: [Function; 49] = [
    sync(Runtime, "cudaDeviceSynchronize"),
    sync(Runtime, "cudaStreamSynchronize"),
    sync(Runtime, "cudaStreamSynchronize_ptsz"),
    sync(Runtime, "cudaEventSynchronize"),
    runtime_copy("cudaMemcpy", COPY),
    runtime_copy("cudaMemcpy_ptds", COPY),
    runtime_copy("cudaMemcpyAsync", COPY_ASYNC),
    runtime_copy("cudaMemcpyAsync_ptsz", COPY_ASYNC),
    // cudaMemcpyPeer(dst, dstDevice, src, srcDevice, count)
    copy(Runtime, "cudaMemcpyPeer", COPY, 4, DEVICE_TO_DEVICE),
    copy(
        Runtime,
        "cudaMemcpyPeerAsync",
        COPY_ASYNC,
        4,
        DEVICE_TO_DEVICE,
    ),
    alloc(Runtime, "cudaMalloc"),
    alloc(Runtime, "cudaMallocAsync"),
    alloc(Runtime, "cudaMallocAsync_ptsz"),
    alloc(Runtime, "cudaMallocManaged"),
    launch(Runtime, "cudaLaunchKernel"),
    launch(Runtime, "cudaLaunchKernel_ptsz"),
    launch(Runtime, "cudaLaunchKernelExC"),
    launch(Runtime, "cudaLaunchCooperativeKernel"),
    sync(Driver, "cuCtxSynchronize"),
    sync(Driver, "cuStreamSynchronize"),
    sync(Driver, "cuStreamSynchronize_ptsz"),
    sync(Driver, "cuEventSynchronize"),
    // cuMemcpy*(dst, src, count[, stream])
    copy(Driver, "cuMemcpyHtoD_v2", COPY, 2, HOST_TO_DEVICE),
    copy(Driver, "cuMemcpyHtoD_v2_ptds", COPY, 2, HOST_TO_DEVICE),
    copy(Driver, "cuMemcpyDtoH_v2", COPY, 2, DEVICE_TO_HOST),
    copy(Driver, "cuMemcpyDtoH_v2_ptds", COPY, 2, DEVICE_TO_HOST),
    copy(Driver, "cuMemcpyDtoD_v2", COPY, 2, DEVICE_TO_DEVICE),
    copy(Driver, "cuMemcpyDtoD_v2_ptds", COPY, 2, DEVICE_TO_DEVICE),
    // cuMemcpy(dst, src, count): unified addressing, the driver infers the direction.
    copy(Driver, "cuMemcpy", COPY, 2, OTHER),
    copy(
        Driver,
        "cuMemcpyHtoDAsync_v2",
        COPY_ASYNC,
        2,
        HOST_TO_DEVICE,
    ),
    copy(
        Driver,
        "cuMemcpyHtoDAsync_v2_ptsz",
        COPY_ASYNC,
        2,
        HOST_TO_DEVICE,
    ),
    copy(
        Driver,
        "cuMemcpyDtoHAsync_v2",
        COPY_ASYNC,
        2,
        DEVICE_TO_HOST,
    ),
    copy(
        Driver,
        "cuMemcpyDtoHAsync_v2_ptsz",
        COPY_ASYNC,
        2,
        DEVICE_TO_HOST,
    ),
    copy(
        Driver,
        "cuMemcpyDtoDAsync_v2",
        COPY_ASYNC,
        2,
        DEVICE_TO_DEVICE,
    ),
    copy(Driver, "cuMemcpyAsync", COPY_ASYNC, 2, OTHER),
    // cuMemcpyPeer(dst, dstContext, src, srcContext, count)
    copy(Driver, "cuMemcpyPeer", COPY, 4, PEER),
    copy(Driver, "cuMemcpyPeerAsync", COPY_ASYNC, 4, PEER),
    alloc(Driver, "cuMemAlloc_v2"),
    alloc(Driver, "cuMemAllocAsync"),
    alloc(Driver, "cuMemAllocManaged"),
    launch(Driver, "cuLaunchKernel"),
    launch(Driver, "cuLaunchKernel_ptsz"),
    launch(Driver, "cuLaunchKernelEx"),
    launch(Driver, "cuLaunchCooperativeKernel"),
    copy(Driver, "cuMemcpy_ptds", COPY, 2, OTHER),
    copy(Driver, "cuMemcpyAsync_ptsz", COPY_ASYNC, 2, OTHER),
    copy(
        Driver,
        "cuMemcpyDtoDAsync_v2_ptsz",
        COPY_ASYNC,
        2,
        DEVICE_TO_DEVICE,
    ),
    alloc(Driver, "cuMemAllocAsync_ptsz"),
    launch(Driver, "cuLaunchKernelEx_ptsz"),
];

/// The attach cookie of `FUNCTIONS[index]`: what the probes need to know about the call.
pub const fn cookie(index: usize) -> u64 {
    let f = &FUNCTIONS[index];
    (index as u64)
        | (f.call as u64) << 8
        | (f.bytes_argument as u64) << 16
        | (f.direction as u64) << 24
        | (f.kind_argument as u64) << 32
}

/// A cookie, read back in the probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cookie(pub u64);

impl Cookie {
    #[inline(always)]
    pub const fn function(self) -> u8 {
        self.0 as u8
    }
    #[inline(always)]
    pub const fn call(self) -> u8 {
        (self.0 >> 8) as u8
    }
    #[inline(always)]
    pub const fn bytes_argument(self) -> u8 {
        (self.0 >> 16) as u8
    }
    #[inline(always)]
    pub const fn direction(self) -> u8 {
        (self.0 >> 24) as u8
    }
    #[inline(always)]
    pub const fn kind_argument(self) -> u8 {
        (self.0 >> 32) as u8
    }
}

/// A call the thread is in (key: thread id). Kept after the call returns, with `depth` 0, so
/// the next call overwrites it in place instead of allocating a map node.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenCall {
    pub start_ns: u64,
    pub bytes: u64,
    pub cookie: u64,
    /// Probed calls open on this thread: the runtime calls the driver, and only the
    /// outermost call counts (its function names it; the inner one is part of it).
    pub depth: u32,
    /// Resolved `direction::*`; for a synchronisation right after an asynchronous copy, the
    /// copy's (see [`SYNC_AFTER_COPY_NS`]).
    pub direction: u32,
    /// When the outermost call returned (0 while it runs).
    pub ended_ns: u64,
}

/// A synchronisation that starts this soon after an asynchronous copy on the same thread
/// returned (in the thread's running time: a preemption between them does not count) waits
/// for that copy: PyTorch's blocking `tensor.to("cuda")` is `cudaMemcpyAsync` then
/// `cudaStreamSynchronize`, back to back. Its time is charged to the copy's direction.
/// Compute launched in between (unprobed in "sync" mode) takes longer than this to launch.
pub const SYNC_AFTER_COPY_NS: u64 = 100_000;

/// A nested call starting this long after its outer call is not nested: the outer call's
/// return was never seen (a thread unwound past it), so its record is stale.
pub const STALE_OPEN_CALL_NS: u64 = 60_000_000_000;

/// Key of the per-process counts: one row per process, function and direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CudaCallKey {
    pub tgid: u32,
    /// Index into [`FUNCTIONS`].
    pub function: u8,
    /// `direction::*` (OTHER for calls that are not copies).
    pub direction: u8,
    pub _padding: [u8; 2],
}

/// What one process's calls of one function did, since the probes loaded.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CudaCallCounters {
    /// Completed calls (failed ones included).
    pub calls: u64,
    /// Time in them, entry to return.
    pub ns: u64,
    /// Bytes copied or allocated by the calls that succeeded.
    pub bytes: u64,
    /// Calls that returned an error.
    pub failures: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_carry_each_functions_facts() {
        for (index, f) in FUNCTIONS.iter().enumerate() {
            let cookie = Cookie(cookie(index));
            assert_eq!(cookie.function() as usize, index, "{}", f.symbol);
            assert_eq!(cookie.call(), f.call, "{}", f.symbol);
            assert_eq!(cookie.bytes_argument(), f.bytes_argument, "{}", f.symbol);
            assert_eq!(cookie.direction(), f.direction, "{}", f.symbol);
            assert_eq!(cookie.kind_argument(), f.kind_argument, "{}", f.symbol);
        }
    }

    #[test]
    fn the_table_is_consistent() {
        assert!(FUNCTIONS.len() <= 255);
        for (index, f) in FUNCTIONS.iter().enumerate() {
            assert!(
                FUNCTIONS[..index].iter().all(|g| g.symbol != f.symbol),
                "{} twice",
                f.symbol
            );
            let prefix_ok = match f.library {
                Library::Runtime => f.symbol.starts_with("cuda"),
                Library::Driver => f.symbol.starts_with("cu") && !f.symbol.starts_with("cuda"),
            };
            assert!(prefix_ok, "{} in the wrong library", f.symbol);
            let copies = f.call == call::COPY || f.call == call::COPY_ASYNC;
            assert_eq!(copies || f.call == call::ALLOC, f.bytes_argument <= 5);
            assert_eq!(
                f.direction == direction::FROM_KIND_ARGUMENT,
                f.kind_argument == 3
            );
        }
    }

    #[test]
    fn memcpy_kinds_map_to_directions() {
        assert_eq!(direction::from_memcpy_kind(1), direction::HOST_TO_DEVICE);
        assert_eq!(direction::from_memcpy_kind(2), direction::DEVICE_TO_HOST);
        assert_eq!(direction::from_memcpy_kind(3), direction::DEVICE_TO_DEVICE);
        assert_eq!(direction::from_memcpy_kind(0), direction::OTHER);
        assert_eq!(direction::from_memcpy_kind(4), direction::OTHER);
        // An int in a 64-bit register: the upper half is not the caller's.
        assert_eq!(
            direction::from_memcpy_kind(0xdead_0000_0000_0001),
            direction::HOST_TO_DEVICE
        );
        assert!(call::blocks(call::SYNC) && call::blocks(call::COPY));
        assert!(!call::blocks(call::COPY_ASYNC) && !call::blocks(call::LAUNCH));
    }
}
