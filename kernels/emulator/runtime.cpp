// The CUDA emulator's runtime: runs a kernel launch on the host, block after block (in a
// shuffled but fixed order, so that no kernel can depend on blocks running in index order);
// the threads of a block are fibers (ucontext) resumed round-robin. Two barriers:
//   - block barrier (__syncthreads): a thread waits until every live thread of its block
//     has arrived;
//   - warp rendezvous (__syncwarp, shuffles, mma.sync, ldmatrix): a thread waits until
//     every live thread of its warp (32 consecutive thread indices) has arrived.
// Threads that have returned no longer take part in either (as on the GPU). A round of the
// scheduler in which no thread can move is a barrier divergence: the launch fails.
// Shared memory (every kernel's static arrays, one section, and the launch's dynamic shared
// memory) is filled with 0xff bytes before each block. Dynamic shared memory is limited as on
// sm_90: 48 KiB unless the kernel opted in to more (vox2vec_emu_set_max_dynamic_shared), at
// most 227 KiB; a guard zone after it catches a block writing past its end.
// Single OS thread. A fiber is entered the first time through makecontext/swapcontext (which
// gives it its own stack) and switched afterwards with _setjmp/_longjmp, which, unlike
// swapcontext, do not save and restore the signal mask with a system call at every switch
// (that was half of the emulator's time). build.rs compiles this without _FORTIFY_SOURCE,
// whose longjmp check refuses jumps between stacks.
#include <setjmp.h>
#include <ucontext.h>

#include <cstdio>
#include <cstring>
#include <map>
#include <vector>

#include "shim.h"

emu_dim3 threadIdx, blockIdx, blockDim, gridDim;
unsigned emu_lane_count = 32;

typedef void (*emu_trampoline)(void**);

struct EmuKernel {
    const char* name;
    emu_trampoline fn;
};
extern "C" const EmuKernel emu_kernels[];
extern "C" const int emu_kernel_count;

// Bounds of the section holding every kernel's __shared__ arrays (shim.h), from the linker.
extern "C" char __start_emu_shared[], __stop_emu_shared[];

namespace {
const size_t STACK_BYTES = 64 * 1024;

struct Fiber {
    ucontext_t ctx;
    jmp_buf jb;
    std::vector<char> stack;
    bool done = true;
    bool started = false;
};

// Dynamic shared memory: the launch's bytes, then a guard zone that must stay 0xff.
const size_t DEFAULT_DYNAMIC_SHARED = 48 * 1024, MAX_DYNAMIC_SHARED = 227 * 1024, GUARD_BYTES = 256;
std::vector<unsigned char> dynamic_shared(MAX_DYNAMIC_SHARED + GUARD_BYTES + 16);
unsigned char* dynamic_base = nullptr;
std::map<const void*, size_t> dynamic_opt_in;

ucontext_t scheduler;
jmp_buf scheduler_jb;
std::vector<Fiber> fibers;
unsigned current = 0;
unsigned threads_in_block = 0;
emu_trampoline running_fn = nullptr;
void** running_args = nullptr;

// Barrier state: arrivals and a generation that advances when all live threads arrived.
unsigned block_live = 0, block_arrived = 0, block_gen = 0;
std::vector<unsigned> warp_live, warp_arrived, warp_gen;
unsigned long long progress = 0;

void set_thread_index(unsigned t) {
    threadIdx.x = t % blockDim.x;
    threadIdx.y = (t / blockDim.x) % blockDim.y;
    threadIdx.z = t / (blockDim.x * blockDim.y);
}

void yield_to_scheduler() {
    if (!_setjmp(fibers[current].jb)) _longjmp(scheduler_jb, 1);
}

// Release a barrier whose live threads have all arrived.
void maybe_release_block() {
    if (block_live > 0 && block_arrived == block_live) {
        block_arrived = 0;
        ++block_gen;
        ++progress;
    }
}
void maybe_release_warp(unsigned w) {
    if (warp_live[w] > 0 && warp_arrived[w] == warp_live[w]) {
        warp_arrived[w] = 0;
        ++warp_gen[w];
        ++progress;
    }
}

void fiber_entry() {
    running_fn(running_args);
    const unsigned t = current, w = t / 32;
    fibers[t].done = true;
    --block_live;
    --warp_live[w];
    ++progress;
    maybe_release_block();
    maybe_release_warp(w);
    // Never resumed: back to the scheduler for good (the context's stack is reused later).
    _longjmp(scheduler_jb, 1);
}
}  // namespace

extern "C" void emu_syncthreads() {
    const unsigned gen = block_gen;
    ++block_arrived;
    maybe_release_block();
    while (block_gen == gen) yield_to_scheduler();
}

extern "C" unsigned emu_linear_tid() { return current; }

extern "C" unsigned char* emu_dynamic_shared() { return dynamic_base; }

// cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES): 0, or 1 above the device's limit.
extern "C" int vox2vec_emu_set_max_dynamic_shared(const void* kernel, unsigned bytes) {
    if (!kernel || bytes > MAX_DYNAMIC_SHARED) return 1;
    dynamic_opt_in[kernel] = bytes;
    return 0;
}

extern "C" void emu_syncwarp() {
    const unsigned w = current / 32, gen = warp_gen[w];
    ++warp_arrived[w];
    maybe_release_warp(w);
    while (warp_gen[w] == gen) yield_to_scheduler();
}

// Per-warp exchange slots for collective operations: 32 lanes x 16 words.
unsigned emu_warp_slots[32][32][16];

extern "C" const void* vox2vec_emu_lookup(const char* name) {
    for (int i = 0; i < emu_kernel_count; ++i)
        if (std::strcmp(emu_kernels[i].name, name) == 0) return (const void*)emu_kernels[i].fn;
    return nullptr;
}

// Returns 0, 1 for an invalid launch configuration, 2 for a barrier divergence (deadlock), 3
// for dynamic shared memory over the kernel's limit, 4 for a write past its end.
extern "C" int vox2vec_emu_launch(const void* kernel, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, unsigned shared_bytes, void** args) {
    const unsigned threads = bx * by * bz;
    if (!kernel || threads == 0 || threads > 1024 || gx == 0 || gy == 0 || gz == 0) return 1;
    const auto opt = dynamic_opt_in.find(kernel);
    if (shared_bytes > (opt == dynamic_opt_in.end() ? DEFAULT_DYNAMIC_SHARED : std::max(opt->second, DEFAULT_DYNAMIC_SHARED))) return 3;
    // 16-byte aligned, as the GPU's dynamic shared memory is for an __align__(16) declaration.
    dynamic_base = dynamic_shared.data() + (16 - (uintptr_t)dynamic_shared.data() % 16) % 16;
    if (fibers.size() < threads) fibers.resize(threads);
    for (auto& f : fibers)
        if (f.stack.empty()) f.stack.resize(STACK_BYTES);
    running_fn = (emu_trampoline)kernel;
    running_args = args;
    gridDim = {gx, gy, gz};
    blockDim = {bx, by, bz};
    threads_in_block = threads;
    const unsigned warps = (threads + 31) / 32;
    // Blocks in a fixed pseudo-random order: i -> (i * stride + offset) mod count, with the
    // stride coprime to the count.
    const unsigned long long count = (unsigned long long)gx * gy * gz;
    unsigned long long stride = 0x9E3779B97F4A7C15ull % count;
    auto gcd = [](unsigned long long a, unsigned long long b) { while (b) { unsigned long long t = a % b; a = b; b = t; } return a; };
    if (stride == 0) stride = 1;
    while (gcd(stride, count) != 1) ++stride;
    const unsigned long long offset = (count * 7 + 3) / 11 % count;
    for (unsigned long long i = 0; i < count; ++i) {
        const unsigned long long b = (i * stride + offset) % count;
        blockIdx = {(unsigned)(b % gx), (unsigned)((b / gx) % gy), (unsigned)(b / ((unsigned long long)gx * gy))};
        std::memset(__start_emu_shared, 0xff, (size_t)(__stop_emu_shared - __start_emu_shared));
        std::memset(dynamic_base, 0xff, shared_bytes + GUARD_BYTES);
        block_live = threads;
        block_arrived = 0;
        warp_live.assign(warps, 0);
        warp_arrived.assign(warps, 0);
        warp_gen.assign(warps, 0);
        for (unsigned t = 0; t < threads; ++t) {
            ++warp_live[t / 32];
            Fiber& f = fibers[t];
            getcontext(&f.ctx);
            f.ctx.uc_stack.ss_sp = f.stack.data();
            f.ctx.uc_stack.ss_size = f.stack.size();
            f.ctx.uc_link = nullptr;
            makecontext(&f.ctx, fiber_entry, 0);
            f.done = false;
            f.started = false;
        }
        bool alive = true;
        while (alive) {
            alive = false;
            const unsigned long long before = progress;
            for (unsigned t = 0; t < threads; ++t) {
                if (fibers[t].done) continue;
                current = t;
                set_thread_index(t);
                // The fiber comes back here (a nonzero _setjmp) when it yields or ends.
                if (!_setjmp(scheduler_jb)) {
                    if (fibers[t].started) _longjmp(fibers[t].jb, 1);
                    fibers[t].started = true;
                    swapcontext(&scheduler, &fibers[t].ctx);
                }
                alive = alive || !fibers[t].done;
            }
            if (alive && progress == before) {
                std::fprintf(stderr, "CUDA emulator: barrier divergence in block (%u, %u, %u): no thread can proceed\n", blockIdx.x, blockIdx.y, blockIdx.z);
                return 2;
            }
        }
        for (size_t i = 0; i < GUARD_BYTES; ++i)
            if (dynamic_base[shared_bytes + i] != 0xff) {
                std::fprintf(stderr, "CUDA emulator: block (%u, %u, %u) wrote byte %zu past the end of its %u bytes of dynamic shared memory\n", blockIdx.x, blockIdx.y, blockIdx.z, i, shared_bytes);
                return 4;
            }
    }
    return 0;
}
