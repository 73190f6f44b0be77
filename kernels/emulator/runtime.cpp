// The CUDA emulator's runtime: runs a kernel launch on the host, block after block; the
// threads of a block are fibers (ucontext), resumed round-robin, each until its next
// __syncthreads() or its end — so every thread reaches barrier i before any passes it, and
// threads that have returned no longer take part (as on the GPU). Single OS thread.
#include <ucontext.h>

#include <cstdio>
#include <cstring>
#include <vector>

#include "shim.h"

emu_dim3 threadIdx, blockIdx, blockDim, gridDim;
double emu_exchange[1024];

typedef void (*emu_trampoline)(void**);

struct EmuKernel {
    const char* name;
    emu_trampoline fn;
};
extern "C" const EmuKernel emu_kernels[];
extern "C" const int emu_kernel_count;

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
emu_trampoline running_fn = nullptr;
void** running_args = nullptr;

void fiber_entry() {
    running_fn(running_args);
    fibers[current].done = true;
    swapcontext(&fibers[current].ctx, &scheduler);
}

void set_thread_index(unsigned t) {
    threadIdx.x = t % blockDim.x;
    threadIdx.y = (t / blockDim.x) % blockDim.y;
    threadIdx.z = t / (blockDim.x * blockDim.y);
}
}  // namespace

extern "C" void emu_syncthreads() {
    swapcontext(&fibers[current].ctx, &scheduler);
}

extern "C" const void* vox2vec_emu_lookup(const char* name) {
    for (int i = 0; i < emu_kernel_count; ++i)
        if (std::strcmp(emu_kernels[i].name, name) == 0) return (const void*)emu_kernels[i].fn;
    return nullptr;
}

// Returns 0, or a non-zero code for an invalid launch.
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
    for (unsigned z = 0; z < gz; ++z)
        for (unsigned y = 0; y < gy; ++y)
            for (unsigned x = 0; x < gx; ++x) {
                blockIdx = {x, y, z};
                for (unsigned t = 0; t < threads; ++t) {
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
                    for (unsigned t = 0; t < threads; ++t) {
                        if (fibers[t].done) continue;
                        current = t;
                        set_thread_index(t);
                        swapcontext(&scheduler, &fibers[t].ctx);
                        alive = alive || !fibers[t].done;
                    }
                }
            }
    return 0;
}
