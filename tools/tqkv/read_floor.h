// The read floor of `tqkv bench attention --backend cuda`: how fast this GPU streams a buffer of
// exactly the cache's bytes, timed the same way as the attention. A decode kernel reads every
// byte once, so the best streaming read of those bytes bounds what any kernel could reach on
// that shape; at short contexts launch, ramp-up and tail keep even a pure read well under the
// card's bandwidth, and the floor says by how much. `tqkv bench append --backend cuda` has the
// same for an append: a pass that reads the input's bytes and writes the rows' bytes.
#pragma once
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace tqkv::cli {

// Launch shapes tried (the floor is the fastest of them): blocks per SM and loads in flight per
// thread vary, since the best of them depends on the size.
int read_floor_variants();
std::string read_floor_name(int variant);
// The read kernel stores to its sink only when one thread's loads XOR to this word: in practice
// never on benchmark data, so the loads stay alive without stores; the test plants it to see
// that every unit is read.
inline constexpr uint32_t kReadFloorSinkWord = 0x7A3C5E1Fu;
// One read of buf[0, bytes) (16-byte aligned, bytes a multiple of 16); see kReadFloorSinkWord.
void launch_read_floor(int variant, const void* buf, size_t bytes, uint32_t* sink, int sm_count, cudaStream_t st);

// Append's floor: one pass that reads in[0, in_bytes) and writes out[0, out_bytes) (both 16-byte
// aligned, sizes multiples of 16), as an append reads its K/V input and writes the cache rows.
void launch_stream_floor(int variant, const void* in, size_t in_bytes, void* out, size_t out_bytes, int sm_count,
                         cudaStream_t st);

}  // namespace tqkv::cli
