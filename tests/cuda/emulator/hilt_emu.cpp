// hilt CUDA emulator runtime (see hilt_emu.h for the model). Test-only.
//
// Built WITHOUT ThreadSanitizer instrumentation in the TSan variant: its own coordination (a
// futex mutex and per-thread futex events over atomics) must stay invisible to TSan, which is
// told the CUDA happens-before edges explicitly with __tsan_release / __tsan_acquire.
#include "hilt_emu.h"

#include <linux/futex.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <atomic>
#include <string>
#include <vector>

extern "C" {
void __tsan_acquire(void* addr) __attribute__((weak));
void __tsan_release(void* addr) __attribute__((weak));
}

namespace emu {

thread_local uint3 tl_threadIdx = {0, 0, 0};
thread_local uint3 tl_blockIdx = {0, 0, 0};
thread_local dim3 tl_blockDim = dim3(1, 1, 1);
thread_local dim3 tl_gridDim = dim3(1, 1, 1);

namespace {

constexpr int kDevices = 2;
constexpr int kMaxThreads = 1024;
constexpr size_t kStaticSmemLimit = 48 * 1024;
constexpr size_t kDefaultDynSmem = 48 * 1024;
constexpr size_t kOptInSmemLimit = 227 * 1024;

inline void hb_release(void* a) {
  if (__tsan_release) __tsan_release(a);
}
inline void hb_acquire(void* a) {
  if (__tsan_acquire) __tsan_acquire(a);
}

long futex(std::atomic<int>* a, int op, int val) {
  return syscall(SYS_futex, reinterpret_cast<int*>(a), op | FUTEX_PRIVATE_FLAG, val, nullptr, nullptr, 0);
}

// 0 unlocked, 1 locked, 2 locked with waiters (Drepper, "Futexes are tricky", mutex 2).
struct Mutex {
  std::atomic<int> v{0};
  void lock() {
    int c = 0;
    if (v.compare_exchange_strong(c, 1)) return;
    if (c != 2) c = v.exchange(2);
    while (c != 0) {
      futex(&v, FUTEX_WAIT, 2);
      c = v.exchange(2);
    }
  }
  void unlock() {
    if (v.fetch_sub(1) != 1) {
      v.store(0);
      futex(&v, FUTEX_WAKE, 1);
    }
  }
};

struct Event {  // binary semaphore
  std::atomic<int> v{0};
  void post() {
    v.store(1);
    futex(&v, FUTEX_WAKE, 1);
  }
  void wait() {
    while (v.exchange(0) == 0) futex(&v, FUTEX_WAIT, 0);
  }
};

struct Abort {};

enum Where { W_RUN = 0, W_BAR, W_COLL, W_EXIT };

struct ThreadSlot {
  Event ev;
  std::atomic<int> rel{0};  // 0 waiting, 1 released, 2 aborted (block failed)
  uint64_t result = 0;
  Where where = W_RUN;
  const char* file = "";
  int line = 0;
  unsigned mask = 0;
};

struct Coll {
  bool active = false;
  unsigned mask = 0, arrived = 0;
  int kind = 0, width = 32;
  const char* file = "";
  int line = 0;
  unsigned gen = 0;
  uint64_t payload[32];
  int arg[32];
  char sync[2];  // TSan sync objects (by generation parity)
};

struct StaticAlloc {
  const void* key;
  void* ptr;
  size_t bytes;
  const char* name;
};

struct Block {
  Mutex mu;
  int nthreads = 0, nwarps = 0, nexited = 0, nblocked = 0;
  uint3 idx{0, 0, 0};
  std::vector<ThreadSlot> th;
  // barrier
  int bar_arrived = 0;
  const char* bar_file = "";
  int bar_line = 0, bar_first = 0;
  unsigned bar_gen = 0;
  char bar_sync[2];
  // warp collectives: per warp, one slot per lowest lane of the mask (disjoint masks coexist)
  std::vector<Coll> colls;  // nwarps * 32
  std::vector<unsigned> exited_lanes, lanes_exist;
  bool failed = false;
  std::string msg;
  std::vector<StaticAlloc> statics;
  size_t static_bytes = 0;
  void* dyn = nullptr;
  size_t dyn_bytes = 0, smem_limit = kDefaultDynSmem;
};

struct Lock {
  Mutex& m;
  bool held = true;
  explicit Lock(Mutex& mm) : m(mm) { m.lock(); }
  ~Lock() {
    if (held) m.unlock();
  }
  void unlock() {
    m.unlock();
    held = false;
  }
  void lock() {
    m.lock();
    held = true;
  }
};

// ------------------------------------------------------------------------------- global state
Mutex g_err_mu;
int g_error_count = 0;
std::string g_errors;
std::atomic<long> g_launches{0}, g_blocks{0};
std::atomic<int> g_last_launch_device{-1};

thread_local int tl_device = 0;
thread_local cudaError_t tl_last = cudaSuccess;
thread_local char tl_errmsg[2048] = "";
thread_local Block* tl_block = nullptr;
thread_local int tl_tid = 0;

Mutex g_attr_mu;
std::vector<std::pair<const void*, int>> g_dyn_attr;  // function -> max dynamic smem bytes

void record_error(const std::string& m) {
  fprintf(stderr, "hilt-emu ERROR: %s\n", m.c_str());
  fflush(stderr);
  g_err_mu.lock();
  ++g_error_count;
  if (g_errors.size() < 16384) g_errors += m + "\n";
  g_err_mu.unlock();
}

void set_last(cudaError_t e, const std::string& m) {
  tl_last = e;
  snprintf(tl_errmsg, sizeof(tl_errmsg), "%s", m.c_str());
}

std::string fmt(const char* f, va_list ap) {
  char buf[1024];
  vsnprintf(buf, sizeof(buf), f, ap);
  return buf;
}

std::string sfmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string sfmt(const char* f, ...) {
  va_list ap;
  va_start(ap, f);
  std::string s = fmt(f, ap);
  va_end(ap);
  return s;
}

const char* base(const char* path) {
  const char* s = strrchr(path, '/');
  return s ? s + 1 : path;
}

std::string where_str(const Block& b, int t) {
  const ThreadSlot& s = b.th[t];
  switch (s.where) {
    case W_BAR: return sfmt("thread %d at __syncthreads %s:%d", t, base(s.file), s.line);
    case W_COLL: return sfmt("thread %d at a warp collective (mask 0x%08x) %s:%d", t, s.mask, base(s.file), s.line);
    case W_EXIT: return sfmt("thread %d exited", t);
    default: return sfmt("thread %d running", t);
  }
}

// Marks the block failed (first message wins) and wakes every waiting thread. Lock held.
void fail_locked(Block& b, const std::string& m) {
  if (b.failed) return;
  b.failed = true;
  b.msg = sfmt("block (%u,%u,%u): ", b.idx.x, b.idx.y, b.idx.z) + m;
  for (auto& t : b.th) {
    t.rel.store(2);
    t.ev.post();
  }
}

[[noreturn]] void fail_and_abort(Block& b, Lock& lk, const std::string& m) {
  fail_locked(b, m);
  lk.unlock();
  throw Abort();
}

// Waits (called with the lock held, returns without it) until released; throws Abort if the block
// failed meanwhile. The releaser wrote the result before releasing: no relock needed.
void block_wait(Block& b, int t, Lock& lk) {
  ThreadSlot& s = b.th[t];
  ++b.nblocked;
  if (b.nblocked + b.nexited == b.nthreads) {
    std::string m = "deadlock: every live thread waits and none can proceed (divergent barriers/shuffles):";
    int shown = 0;
    for (int i = 0; i < b.nthreads && shown < 8; ++i) {
      if (b.th[i].where != W_EXIT) {
        m += " [" + where_str(b, i) + "]";
        ++shown;
      }
    }
    --b.nblocked;
    fail_and_abort(b, lk, m);
  }
  s.rel.store(0);
  lk.unlock();
  int r;
  while ((r = s.rel.load()) == 0) s.ev.wait();
  if (r != 1) throw Abort();
}

void release(Block& b, int t) {
  ThreadSlot& s = b.th[t];
  s.where = W_RUN;
  --b.nblocked;
  s.rel.store(1);
  s.ev.post();
}

void release_barrier(Block& b) {
  for (int i = 0; i < b.nthreads; ++i)
    if (b.th[i].where == W_BAR) release(b, i);
  b.bar_arrived = 0;
  ++b.bar_gen;
}

Block* cur_block(const char* what) {
  Block* b = tl_block;
  if (!b) {
    fprintf(stderr, "hilt-emu: %s called outside a kernel\n", what);
    abort();
  }
  return b;
}

// ------------------------------------------------------------------------------- thread pool
struct Worker {
  Event start;
  pthread_t th;
  int idx;
};

std::vector<Worker*> g_workers;
std::atomic<Block*> g_block{nullptr};
ThreadBody g_body = nullptr;
void* g_ctx = nullptr;
dim3 g_grid, g_bdim;
std::atomic<int> g_done{0};
Event g_main_ev;
char g_start_sync, g_done_sync;

void thread_exit(Block& b, int t) {
  Lock lk(b.mu);
  ThreadSlot& s = b.th[t];
  s.where = W_EXIT;
  ++b.nexited;
  const int w = t / 32, lane = t % 32;
  b.exited_lanes[w] |= 1u << lane;
  if (!b.failed) {
    for (int k = 0; k < 32; ++k) {
      const Coll& c = b.colls[w * 32 + k];
      if (c.active && (c.mask >> lane & 1u) && !(c.arrived >> lane & 1u)) {
        fail_locked(b, sfmt("lane %d of warp %d exited while lanes 0x%08x wait for it in a warp collective "
                            "(mask 0x%08x) at %s:%d",
                            lane, w, c.arrived, c.mask, base(c.file), c.line));
        return;
      }
    }
    if (b.bar_arrived > 0 && b.bar_arrived + b.nexited == b.nthreads) release_barrier(b);
    if (b.nblocked > 0 && b.nblocked + b.nexited == b.nthreads && !b.failed) {
      std::string m = "deadlock after thread exit:";
      for (int i = 0; i < b.nthreads; ++i)
        if (b.th[i].where != W_EXIT) m += " [" + where_str(b, i) + "]";
      fail_locked(b, m);
    }
  }
}

void* worker_main(void* p) {
  Worker* w = static_cast<Worker*>(p);
  for (;;) {
    w->start.wait();
    Block* b = g_block.load();
    const int t = w->idx;
    tl_block = b;
    tl_tid = t;
    tl_blockDim = g_bdim;
    tl_gridDim = g_grid;
    tl_blockIdx = b->idx;
    tl_threadIdx = uint3{t % g_bdim.x, (t / g_bdim.x) % g_bdim.y, t / (g_bdim.x * g_bdim.y)};
    hb_acquire(&g_start_sync);
    try {
      g_body(g_ctx);
    } catch (Abort&) {
    } catch (...) {
      Lock lk(b->mu);
      fail_locked(*b, sfmt("thread %d threw a C++ exception", t));
    }
    thread_exit(*b, t);
    tl_block = nullptr;
    hb_release(&g_done_sync);
    if (g_done.fetch_add(1) + 1 == b->nthreads) g_main_ev.post();
  }
  return nullptr;
}

void ensure_workers(int n) {
  while ((int)g_workers.size() < n) {
    Worker* w = new Worker();
    w->idx = (int)g_workers.size();
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 4 << 20);
    if (pthread_create(&w->th, &attr, worker_main, w) != 0) {
      fprintf(stderr, "hilt-emu: pthread_create failed\n");
      abort();
    }
    pthread_attr_destroy(&attr);
    pthread_detach(w->th);
    g_workers.push_back(w);
  }
}

size_t dyn_limit(const void* fn) {
  Lock lk(g_attr_mu);
  for (auto& e : g_dyn_attr)
    if (e.first == fn) return (size_t)e.second;
  return kDefaultDynSmem;
}

Mutex g_launch_mu;  // one launch at a time (the emulator has one "SM")

}  // namespace

// ------------------------------------------------------------------------------- kernel API
void syncthreads(const char* file, int line) {
  Block& b = *cur_block("__syncthreads");
  const int t = tl_tid;
  Lock lk(b.mu);
  if (b.failed) {
    lk.unlock();
    throw Abort();
  }
  const int w = t / 32, lane = t % 32;
  for (int k = 0; k < 32; ++k) {
    const Coll& c = b.colls[w * 32 + k];
    if (c.active && (c.mask >> lane & 1u) && !(c.arrived >> lane & 1u))
      fail_and_abort(b, lk, sfmt("divergence: thread %d reached __syncthreads at %s:%d while lanes 0x%08x of its warp "
                                 "wait for it in a warp collective (mask 0x%08x) at %s:%d",
                                 t, base(file), line, c.arrived, c.mask, base(c.file), c.line));
  }
  if (b.bar_arrived == 0) {
    b.bar_file = file;
    b.bar_line = line;
    b.bar_first = t;
  } else if (b.bar_line != line || strcmp(b.bar_file, file) != 0) {
    fail_and_abort(b, lk, sfmt("divergence: threads reached different __syncthreads: thread %d at %s:%d, thread %d at "
                               "%s:%d",
                               b.bar_first, base(b.bar_file), b.bar_line, t, base(file), line));
  }
  char* obj = &b.bar_sync[b.bar_gen & 1];
  hb_release(obj);
  ThreadSlot& s = b.th[t];
  s.where = W_BAR;
  s.file = file;
  s.line = line;
  ++b.bar_arrived;
  if (b.bar_arrived + b.nexited == b.nthreads) {
    s.where = W_RUN;  // not waiting: release_barrier skips it
    release_barrier(b);
    lk.unlock();
  } else {
    block_wait(b, t, lk);
  }
  hb_acquire(obj);
}

uint64_t warp_collective(unsigned mask, int kind, uint64_t payload, int arg, int width, const char* file, int line) {
  Block& b = *cur_block("warp collective");
  const int t = tl_tid, w = t / 32, lane = t % 32;
  Lock lk(b.mu);
  if (b.failed) {
    lk.unlock();
    throw Abort();
  }
  const char* what = kind == K_SYNCWARP ? "__syncwarp" : "__shfl_*_sync";
  if (!(mask >> lane & 1u))
    fail_and_abort(b, lk, sfmt("thread %d (lane %d) called %s at %s:%d with mask 0x%08x that does not name it", t, lane,
                               what, base(file), line, mask));
  if (width < 1 || width > 32 || (width & (width - 1)))
    fail_and_abort(b, lk, sfmt("%s at %s:%d: width %d is not a power of 2 <= 32", what, base(file), line, width));
  if (mask & ~b.lanes_exist[w])
    fail_and_abort(b, lk, sfmt("%s at %s:%d: mask 0x%08x names lanes that do not exist (warp %d has lanes 0x%08x)", what,
                               base(file), line, mask, w, b.lanes_exist[w]));
  if (mask & b.exited_lanes[w])
    fail_and_abort(b, lk, sfmt("%s at %s:%d: mask 0x%08x names exited lanes 0x%08x of warp %d", what, base(file), line,
                               mask, mask & b.exited_lanes[w], w));
  for (int i = 0; i < 32; ++i) {
    if (!(mask >> i & 1u) || i == lane) continue;
    const ThreadSlot& o = b.th[w * 32 + i];
    if (o.where == W_BAR)
      fail_and_abort(b, lk, sfmt("divergence: lane %d waits at __syncthreads %s:%d while lane %d of its warp calls %s "
                                 "(mask 0x%08x) at %s:%d",
                                 i, base(o.file), o.line, lane, what, mask, base(file), line));
  }
  Coll* c = nullptr;
  for (int k = 0; k < 32; ++k) {
    Coll& x = b.colls[w * 32 + k];
    if (x.active && (x.mask & mask)) {
      if (x.mask != mask)
        fail_and_abort(b, lk, sfmt("divergence: lanes of warp %d use overlapping different masks: 0x%08x at %s:%d and "
                                   "0x%08x at %s:%d",
                                   w, x.mask, base(x.file), x.line, mask, base(file), line));
      if (x.kind != kind || x.line != line || strcmp(x.file, file) != 0)
        fail_and_abort(b, lk, sfmt("divergence: lanes of mask 0x%08x (warp %d) reached different warp collectives: "
                                   "%s:%d and %s:%d",
                                   mask, w, base(x.file), x.line, base(file), line));
      c = &x;
    }
  }
  if (!c) {
    c = &b.colls[w * 32 + __builtin_ctz(mask)];
    c->active = true;
    c->mask = mask;
    c->arrived = 0;
    c->kind = kind;
    c->width = width;
    c->file = file;
    c->line = line;
  }
  c->payload[lane] = payload;
  c->arg[lane] = arg;
  c->arrived |= 1u << lane;
  char* obj = &c->sync[c->gen & 1];
  hb_release(obj);
  ThreadSlot& s = b.th[t];
  if (c->arrived == mask) {
    for (int i = 0; i < 32; ++i) {
      if (!(mask >> i & 1u)) continue;
      int src = i;
      const int a = c->arg[i], seg = i & ~(c->width - 1), pos = i & (c->width - 1);
      switch (kind) {
        case K_SHFL_IDX: src = seg + (a & (c->width - 1)); break;
        case K_SHFL_UP: src = pos >= a ? i - a : i; break;
        case K_SHFL_DOWN: src = pos + a < c->width ? i + a : i; break;
        case K_SHFL_XOR: src = ((i ^ a) & ~(c->width - 1)) == seg ? (i ^ a) : i; break;
        default: break;
      }
      if (kind != K_SYNCWARP && (src < 0 || src > 31 || !(mask >> src & 1u)))
        fail_and_abort(b, lk, sfmt("lane %d reads lane %d, which is not in the shuffle mask 0x%08x, at %s:%d", i, src,
                                   mask, base(file), line));
      b.th[w * 32 + i].result = kind == K_SYNCWARP ? 0 : c->payload[src];
    }
    c->active = false;
    ++c->gen;
    for (int i = 0; i < 32; ++i)
      if ((mask >> i & 1u) && i != lane) release(b, w * 32 + i);
    lk.unlock();
  } else {
    s.where = W_COLL;
    s.file = file;
    s.line = line;
    s.mask = mask;
    block_wait(b, t, lk);
  }
  hb_acquire(obj);
  return s.result;
}

void* shared_static(const void* key, size_t bytes, size_t align, const char* name) {
  Block& b = *cur_block("__shared__");
  Lock lk(b.mu);
  if (b.failed) {
    lk.unlock();
    throw Abort();
  }
  for (auto& e : b.statics) {
    if (e.key == key) {
      void* p = e.ptr;
      lk.unlock();
      hb_acquire(p);
      return p;
    }
  }
  if (align > 16) fail_and_abort(b, lk, sfmt("__shared__ %s: alignment %zu > 16 unsupported", name, align));
  if (b.static_bytes + bytes > kStaticSmemLimit)
    fail_and_abort(b, lk, sfmt("static __shared__ memory %zu + %zu bytes (%s) > %zu", b.static_bytes, bytes, name,
                               kStaticSmemLimit));
  if (b.static_bytes + bytes + b.dyn_bytes > kOptInSmemLimit)
    fail_and_abort(b, lk, sfmt("static + dynamic shared memory %zu bytes > %zu", b.static_bytes + bytes + b.dyn_bytes,
                               kOptInSmemLimit));
  void* p = malloc(bytes ? bytes : 1);
  memset(p, 0xff, bytes);
  b.static_bytes += bytes;
  b.statics.push_back(StaticAlloc{key, p, bytes, name});
  hb_release(p);
  return p;
}

void* shared_dynamic() {
  Block& b = *cur_block("extern __shared__");
  return b.dyn;
}

void fail_kernel(const char* f, ...) {
  va_list ap;
  va_start(ap, f);
  std::string m = fmt(f, ap);
  va_end(ap);
  Block& b = *cur_block("fail_kernel");
  Lock lk(b.mu);
  fail_and_abort(b, lk, m);
}

cudaError_t func_set_attribute(const void* fn, int attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) {
    set_last(cudaErrorInvalidValue, sfmt("cudaFuncSetAttribute: attribute %d not emulated", attr));
    return cudaErrorInvalidValue;
  }
  if (value < 0 || (size_t)value > kOptInSmemLimit) {
    set_last(cudaErrorInvalidValue,
             sfmt("cudaFuncSetAttribute(MaxDynamicSharedMemorySize, %d): above the %zu-byte limit", value, kOptInSmemLimit));
    record_error(tl_errmsg);
    return cudaErrorInvalidValue;
  }
  Lock lk(g_attr_mu);
  for (auto& e : g_dyn_attr) {
    if (e.first == fn) {
      e.second = value;
      return cudaSuccess;
    }
  }
  g_dyn_attr.emplace_back(fn, value);
  return cudaSuccess;
}

void run_grid(const void* fn, const char* name, const Cfg& c, ThreadBody body, void* ctx) {
  const long nt = (long)c.block.x * c.block.y * c.block.z;
  const std::string fname = name;
  if (nt < 1 || nt > kMaxThreads || c.block.x > 1024 || c.block.y > 1024 || c.block.z > 64 || c.grid.x < 1 ||
      c.grid.y < 1 || c.grid.z < 1 || c.grid.x > 2147483647u || c.grid.y > 65535 || c.grid.z > 65535) {
    const std::string m = sfmt("invalid launch configuration grid (%u,%u,%u) block (%u,%u,%u) %s", c.grid.x, c.grid.y,
                               c.grid.z, c.block.x, c.block.y, c.block.z, fname.c_str());
    record_error(m);
    set_last(cudaErrorInvalidConfiguration, m);
    return;
  }
  const size_t lim = dyn_limit(fn);
  if (c.smem > lim) {
    const std::string m = sfmt("launch asks for %zu bytes of dynamic shared memory > %zu allowed (%s; above 48 KiB "
                               "needs cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize)) %s",
                               c.smem, lim, lim == kDefaultDynSmem ? "default" : "opt-in", fname.c_str());
    record_error(m);
    set_last(cudaErrorInvalidValue, m);
    return;
  }
  Lock launch_lock(g_launch_mu);
  g_launches.fetch_add(1);
  g_last_launch_device.store(tl_device);
  ensure_workers((int)nt);
  g_body = body;
  g_ctx = ctx;
  g_grid = c.grid;
  g_bdim = c.block;
  std::vector<Block*> done;
  std::string err;
  const int nwarps = (int)((nt + 31) / 32);
  for (unsigned z = 0; z < c.grid.z && err.empty(); ++z) {
    for (unsigned y = 0; y < c.grid.y && err.empty(); ++y) {
      for (unsigned x = 0; x < c.grid.x && err.empty(); ++x) {
        Block* b = new Block();
        b->nthreads = (int)nt;
        b->nwarps = nwarps;
        b->idx = uint3{x, y, z};
        b->th = std::vector<ThreadSlot>(nt);
        b->colls = std::vector<Coll>(nwarps * 32);
        b->exited_lanes.assign(nwarps, 0u);
        b->lanes_exist.assign(nwarps, 0u);
        for (int t = 0; t < nt; ++t) b->lanes_exist[t / 32] |= 1u << (t % 32);
        b->dyn_bytes = c.smem;
        b->dyn = malloc(c.smem ? c.smem : 1);
        memset(b->dyn, 0xff, c.smem);
        b->smem_limit = lim;
        g_block.store(b);
        g_done.store(0);
        hb_release(&g_start_sync);
        for (int t = 0; t < nt; ++t) g_workers[t]->start.post();
        while (g_done.load() < nt) g_main_ev.wait();
        g_blocks.fetch_add(1);
        done.push_back(b);
        if (b->failed) err = b->msg;
      }
    }
  }
  hb_acquire(&g_done_sync);
  for (Block* b : done) {
    for (auto& e : b->statics) free(e.ptr);
    free(b->dyn);
    delete b;
  }
  g_block.store(nullptr);
  launch_lock.unlock();
  if (!err.empty()) {
    const std::string m = "kernel " + fname + ": " + err;
    record_error(m);
    set_last(cudaErrorLaunchFailure, m);
  }
}

}  // namespace emu

// ------------------------------------------------------------------------------- CUDA runtime API
using namespace emu;

extern "C" {
cudaError_t cudaSetDevice(int device) {
  if (device < 0 || device >= kDevices) {
    set_last(cudaErrorInvalidDevice, sfmt("invalid device ordinal %d (the emulator has %d)", device, kDevices));
    return cudaErrorInvalidDevice;
  }
  tl_device = device;
  return cudaSuccess;
}
cudaError_t cudaGetDevice(int* device) {
  if (!device) return cudaErrorInvalidValue;
  *device = tl_device;
  return cudaSuccess;
}
cudaError_t cudaGetDeviceCount(int* count) {
  if (!count) return cudaErrorInvalidValue;
  *count = kDevices;
  return cudaSuccess;
}
cudaError_t cudaDriverGetVersion(int* v) {
  if (!v) return cudaErrorInvalidValue;
  *v = CUDART_VERSION;
  return cudaSuccess;
}
cudaError_t cudaRuntimeGetVersion(int* v) {
  if (!v) return cudaErrorInvalidValue;
  *v = CUDART_VERSION;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  if (!value) return cudaErrorInvalidValue;
  if (device < 0 || device >= kDevices) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = (int)kStaticSmemLimit; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = 1; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = (int)kOptInSmemLimit; return cudaSuccess;
  }
  set_last(cudaErrorInvalidValue, sfmt("cudaDeviceGetAttribute: attribute %d not emulated", (int)attr));
  return cudaErrorInvalidValue;
}
cudaError_t cudaGetLastError(void) {
  cudaError_t e = tl_last;
  tl_last = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError(void) { return tl_last; }
const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    case cudaErrorNoDevice: return "cudaErrorNoDevice";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorLaunchOutOfResources: return "cudaErrorLaunchOutOfResources";
    case cudaErrorLaunchFailure: return "cudaErrorLaunchFailure";
  }
  return "cudaErrorUnknown";
}
const char* cudaGetErrorString(cudaError_t e) {
  if (e != cudaSuccess && tl_errmsg[0]) return tl_errmsg;  // the emulator's detailed message
  return e == cudaSuccess ? "no error" : cudaGetErrorName(e);
}

// ---- test hooks (tests/cuda/): emulator errors, devices, counters
__attribute__((visibility("default"))) int hilt_emu_error_count(void) {
  g_err_mu.lock();
  int n = g_error_count;
  g_err_mu.unlock();
  return n;
}
__attribute__((visibility("default"))) const char* hilt_emu_errors(void) {
  static thread_local std::string copy;
  g_err_mu.lock();
  copy = g_errors;
  g_err_mu.unlock();
  return copy.c_str();
}
__attribute__((visibility("default"))) void hilt_emu_reset_errors(void) {
  g_err_mu.lock();
  g_error_count = 0;
  g_errors.clear();
  g_err_mu.unlock();
}
__attribute__((visibility("default"))) int hilt_emu_current_device(void) { return tl_device; }
__attribute__((visibility("default"))) int hilt_emu_last_launch_device(void) { return g_last_launch_device.load(); }
__attribute__((visibility("default"))) long hilt_emu_launch_count(void) { return g_launches.load(); }
__attribute__((visibility("default"))) long hilt_emu_block_count(void) { return g_blocks.load(); }
}
