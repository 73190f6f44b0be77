// The CUDA emulator's runtime: runs a kernel launch on the host, block after block (in a
// shuffled but fixed order, so that no kernel can depend on blocks running in index order);
// the threads of a block are fibers (ucontext) resumed round-robin. Two barriers:
//   - block barrier (__syncthreads): a thread waits until every live thread of its block
//     has arrived;
//   - warp rendezvous (__syncwarp, shuffles, mma.sync, ldmatrix): a thread waits until
//     every live thread of its warp (32 consecutive thread indices) has arrived.
// Threads that have returned no longer take part in either (as on the GPU). A round of the
// scheduler in which no thread can move is a barrier divergence: the launch fails.
// Shared memory (every kernel's, one section) is filled with 0xff bytes before each block.
// Single OS thread.
#include <ucontext.h>

#include <cstdio>
#include <cstring>
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
    std::vector<char> stack;
    bool done = true;
};

ucontext_t scheduler;
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

void yield_to_scheduler() { swapcontext(&fibers[current].ctx, &scheduler); }

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
    swapcontext(&fibers[t].ctx, &scheduler);
}
}  // namespace

extern "C" void emu_syncthreads() {
    const unsigned gen = block_gen;
    ++block_arrived;
    maybe_release_block();
    while (block_gen == gen) yield_to_scheduler();
}

extern "C" unsigned emu_linear_tid() { return current; }

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

// Returns 0, 1 for an invalid launch configuration, 2 for a barrier divergence (deadlock).
extern "C" int vox2vec_emu_launch(const void* kernel, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, void** args) {
    const unsigned threads = bx * by * bz;
    if (!kernel || threads == 0 || threads > 1024 || gx == 0 || gy == 0 || gz == 0) return 1;
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
        }
        bool alive = true;
        while (alive) {
            alive = false;
            const unsigned long long before = progress;
            for (unsigned t = 0; t < threads; ++t) {
                if (fibers[t].done) continue;
                current = t;
                set_thread_index(t);
                swapcontext(&scheduler, &fibers[t].ctx);
                alive = alive || !fibers[t].done;
            }
            if (alive && progress == before) {
                std::fprintf(stderr, "CUDA emulator: barrier divergence in block (%u, %u, %u): no thread can proceed\n", blockIdx.x, blockIdx.y, blockIdx.z);
                return 2;
            }
        }
    }
    return 0;
}
