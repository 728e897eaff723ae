// A queue of pread requests served by native threads (engine.tiers.io loads it with ctypes).
//
// Why native: Python reader threads need the GIL after every read to complete their future and take
// the next request; while the model's Python code holds it, the disk idles (measured: a pure-Python
// busy thread cut O_DIRECT streaming from ~2.1 to ~0.25 GB/s). These threads never touch Python:
// submit() queues the chunks of a ticket, workers pread() them, wait() blocks in C (ctypes releases
// the GIL around the call). Tickets are reused by the Python side, so steady streaming creates no
// objects beyond the queue's own storage.
#include <atomic>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

#include <sys/types.h>
#include <unistd.h>

#define PQ_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

using i64 = int64_t;

i64 now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
        std::chrono::steady_clock::now().time_since_epoch()).count();
}

struct Ticket {
    std::mutex mu;
    std::condition_variable cv;
    int pending = 0;         // chunks not finished
    int error = 0;           // first failure: errno, or -1 for end of file before `need` bytes
    i64 err_offset = 0;      // the failed chunk's file offset and needed length
    i64 err_need = 0;
    i64 t_submit = 0, t_first = 0, t_last = 0, bytes = 0;  // submitted, first chunk start, last chunk end (steady clock ns)
};

struct Chunk {
    Ticket* ticket;
    i64 offset, length, need;  // read `length` bytes at `offset`; at least `need` must arrive
    uint8_t* dest;
};

class Queue {
public:
    Queue(int fd, int threads) : fd_(fd) {
        try {
            for (int i = 0; i < threads; ++i) workers_.emplace_back([this] { loop(); });
        } catch (...) {  // std::system_error (thread limit) or bad_alloc: stop the started ones, rethrow
            stop();
            throw;
        }
    }

    ~Queue() {
        stop();
        // chunks never started: their tickets complete as cancelled
        for (const Chunk& c : queue_) finish(c, ECANCELED, 0, 0, 0);
    }

    void submit(Ticket* t, int n, const i64* off, const i64* len, const i64* need, const uint64_t* dest, i64 chunk) {
        std::lock_guard<std::mutex> g(mu_);
        int count = 0;
        for (int i = 0; i < n; ++i) {
            for (i64 c = 0; c < len[i]; c += chunk) {
                const i64 m = len[i] - c < chunk ? len[i] - c : chunk;
                const i64 nd = need[i] - c < 0 ? 0 : (need[i] - c < m ? need[i] - c : m);
                queue_.push_back({t, off[i] + c, m, nd, reinterpret_cast<uint8_t*>(dest[i]) + c});
                ++count;
            }
        }
        {
            std::lock_guard<std::mutex> tg(t->mu);
            t->pending = count;
            t->error = 0;
            t->err_offset = t->err_need = 0;
            t->t_first = t->t_last = t->bytes = 0;
            t->t_submit = now_ns();
        }
        if (count == 0) t->cv.notify_all();
        cv_.notify_all();
    }

    void stop() {
        {
            std::lock_guard<std::mutex> g(mu_);
            stopping_ = true;
        }
        cv_.notify_all();
        for (auto& t : workers_) t.join();
        workers_.clear();
    }

    void fail_at(i64 offset, i64 end, int err) {
        std::lock_guard<std::mutex> g(mu_);
        fault_offset_ = offset;
        fault_end_ = end;
        fault_errno_ = err;
    }

private:
    void loop() {
        for (;;) {
            Chunk c;
            int fault = 0;
            {
                std::unique_lock<std::mutex> lk(mu_);
                cv_.wait(lk, [&] { return stopping_ || !queue_.empty(); });
                if (stopping_) return;
                c = queue_.front();
                queue_.pop_front();
                if (fault_errno_ && c.offset >= fault_offset_ && c.offset < fault_end_) fault = fault_errno_;
            }
            const i64 t0 = now_ns();
            i64 got = 0;
            int err = fault;
            while (!err && got < c.need) {
                const ssize_t r = pread(fd_, c.dest + got, size_t(c.length - got), off_t(c.offset + got));
                if (r > 0) {
                    got += r;
                } else if (r == 0) {
                    err = -1;  // end of file
                } else if (errno != EINTR) {
                    err = errno;
                }
            }
            finish(c, err, got, t0, now_ns());
        }
    }

    static void finish(const Chunk& c, int err, i64 got, i64 t0, i64 t1) {
        Ticket* t = c.ticket;
        std::lock_guard<std::mutex> g(t->mu);
        if (err && !t->error) {
            t->error = err;
            t->err_offset = c.offset;
            t->err_need = c.need;
        }
        if (t0 && (!t->t_first || t0 < t->t_first)) t->t_first = t0;
        if (t1 > t->t_last) t->t_last = t1;
        t->bytes += got;
        if (--t->pending == 0) t->cv.notify_all();
    }

    int fd_;
    std::mutex mu_;
    std::condition_variable cv_;
    std::deque<Chunk> queue_;
    bool stopping_ = false;
    i64 fault_offset_ = 0, fault_end_ = 0;
    int fault_errno_ = 0;
    std::vector<std::thread> workers_;
};

}  // namespace

PQ_EXPORT int pq_abi_version() { return 3; }

// nullptr when the threads cannot be started (an exception must not cross the C boundary: it aborts)
PQ_EXPORT void* pq_open(int fd, int threads) {
    try {
        return new Queue(fd, threads < 1 ? 1 : threads);
    } catch (...) {
        return nullptr;
    }
}

PQ_EXPORT void pq_close(void* q) { delete static_cast<Queue*>(q); }

PQ_EXPORT void* pq_ticket_new() { return new (std::nothrow) Ticket(); }

PQ_EXPORT void pq_ticket_free(void* t) { delete static_cast<Ticket*>(t); }

// Queue reads of spans i < n: `len[i]` bytes at file offset `off[i]` into `dest[i]`, at least
// `need[i]` of them required, each span split into `chunk`-byte requests spread over the workers.
// The ticket must not have reads pending (the caller waits before reusing it).
PQ_EXPORT void pq_submit(void* q, void* t, int n, const i64* off, const i64* len, const i64* need,
                         const uint64_t* dest, i64 chunk) {
    static_cast<Queue*>(q)->submit(static_cast<Ticket*>(t), n, off, len, need, dest, chunk);
}

// Block until the ticket's reads are done. Returns 0, an errno, or -1 (end of file); info receives
// the failed chunk's offset and needed length, then the first start and last end (steady-clock ns),
// the bytes read and the submit time.
PQ_EXPORT int pq_wait(void* t, i64* info) {
    Ticket* tk = static_cast<Ticket*>(t);
    std::unique_lock<std::mutex> lk(tk->mu);
    tk->cv.wait(lk, [&] { return tk->pending == 0; });
    info[0] = tk->err_offset;
    info[1] = tk->err_need;
    info[2] = tk->t_first;
    info[3] = tk->t_last;
    info[4] = tk->bytes;
    info[5] = tk->t_submit;
    return tk->error;
}

PQ_EXPORT int pq_done(void* t) {
    Ticket* tk = static_cast<Ticket*>(t);
    std::lock_guard<std::mutex> g(tk->mu);
    return tk->pending == 0;
}

// Fault injection for tests: chunks starting in [offset, end) fail with `err` (an errno, or -1: the
// file ends there, a short read); err 0 turns it off.
PQ_EXPORT void pq_fail_at(void* q, i64 offset, i64 end, int err) { static_cast<Queue*>(q)->fail_at(offset, end, err); }
