#!/usr/bin/env bash
# GPU sessions' measurements for the training- and generation-speed issues, as numbered phases:
#   1. the blt_mid train step with 4- and 8-byte patches (speed follows real work), BLT-D-4 and the
#      PyTorch port in the same run, both BLT rows profiled;
#   2. the plain train step under XLA flag sets that could fuse more (one process per set);
#   3. the sampler's cold compile (BLT-1B, ar) with XLA's default compile threads and with 16, each
#      in a fresh process with an empty compilation cache;
#   4. ar at batch 1 and 32, profiled (the unrolled program's op lists);
#   5. the 1B-class train step (BLT-1B with remat and scanned global layers) next to the port (4 rows
#      of 4 096 bytes; skipped on a card under 100 GB: on an H100 both ran out of memory at 8 rows in
#      run 12 and at 4 in run 13);
#   6. the attention kernels against the XLA path (attention_check.py), and whether the GPU's JAX
#      skips a boolean mask's bias gradient (jax-ml/jax#39512);
#   7. plain BLT, BLT-D-4 and BLT-D-8 next to the port, plain BLT and BLT-D-4 profiled (since run 8:
#      SwiGLU's one-pass gradient, layers.swiglu, shows in the feed-forward rows of the profile);
#   8. ar and blt_s8 at batch 1 and 32 as they run (the reference for 9, 10, 12, 14, 15 and 25; since
#      run 12 that includes the direct layout and in-place writes, so 15 repeats it), ar at
#      batch 1 and 32 and blt_s8 at batch 32 profiled (its batch-32 pass is 1.43x batch 1's, target 1.3x):
#      one-query attention products padded to two query rows on the GPU (attention.GPU_MIN_QUERY_ROWS);
#   9. the same at batch 32 without that padding (--min-query-rows 1: run 8's program, whose
#      one-row products ran as reduction fusions), profiled: the before of 8;
#   10. the same at batch 1 and 32 with every attention call on cuDNN, decode steps included
#      (--attention-impl cudnn: one fused kernel for the ~7 of XLA's attention per layer and step);
#   11. the same at batch 1 with XLA's block-level (Triton) fusions, which may put a decode step's
#      softmax chain (select, max, sum, normalize, convert: 5 kernels per layer) in one kernel.
#   12. ar and blt_s8 at batch 1 and 32 with decode steps' attention in one Pallas kernel
#      (--decode-kernel decode: fastblt.model.decode_attention), both batches profiled;
#   13. ar at batch 1 with 4 000- and 16 000-byte prompts, XLA's decode attention and the kernel
#      (which skips key blocks no query sees: the global model's unused patch slots);
#   14. ar and blt_s8 at batch 1 and 32 with the decode kernel's direct layout alone (--decode-direct-rows 16
#       --no-decode-cache-write since both became the default in run 12;
#       no zero rows or transposes around calls of 1-16 query rows; run 10 ran 4), batch 1 profiled:
#       against phase 8 as it ran before run 12
#       (run 10 measured its first version, products without Triton's dot; since 2026-12-05 the
#       kernel repeats the rows in registers and keeps the dot);
#   15. the same with the kernel also writing the caches (--decode-cache-write: no scatter kernels;
#       since 2026-12-05 it also reads q, k and v in place out of the layer's q|k|v product).
#   16. where a cold compile of ar (batch 1) goes: XLA's own logging timers (HLO passes, autotuning,
#       LLVM, ptxas) in a fresh process with an empty cache; the timer lines in compile_log/timers.txt.
#   17. whether XLA's own caches in the persistent cache directory (jax_persistent_cache_enable_xla_caches:
#       autotuning results alone, JAX's default, or "all": compiled kernels too) shorten a second
#       program's compile: ar at batch 1, then ar at batch 32 and blt_s8 at batch 1, one fresh
#       process each, one empty cache directory per setting.
#   18. ar's program (batch 1) compiled whole, as its prefill and loop halves one after the other, and
#       as the two halves in two threads at once (split_compile.py), one fresh process each, no cache.
#   20. ar and blt_s8 at batch 1 and 32 with the kernel writing the caches in its dot layout
#       (--decode-cache-write alone; phase 15 paired it with the direct layout), batch 1 profiled.
#   19. (gone) the decoder's cross-attention as row blocks over windows of patch slots on cuDNN: run 8
#       measured it slower (train_speed.md), and the windowed form was removed.
#   22. the decode kernel compiled by Triton against the XLA path in each layout (dot, direct, cache
#       writes, in-place head views) at BLT-1B's decode shapes (decode_check.py; exits 1 on a
#       mismatch): phases 14 and 15 run only after it passed on the same machine.
#   21. why the sampler's cold compile of ar (batch 1) took 22.7 s in phase 17 (compile_time.py: the
#       sampler's _compile_halves, loop half donated, an empty cache directory) and 9.4 s in phase 18
#       (split_compile.py: the same halves in two threads, no donation, no cache directory): the
#       sampler's path and split_compile.py each with and without a cache directory, and the sampler's
#       path with one but XLA's autotuning cache off (JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES=none); one
#       fresh process and one empty cache directory each.
#   23. where a cold compile of ar (batch 1) on the sampler's path spends the time a cache directory
#       adds (phase 21 on one H200: 7.7 s of XLA compile without a directory, 21.4 s with one, split
#       halves 17.8 s without): without and with an empty directory, alternated twice, JAX's compile
#       stages timed (cache key, XLA's compile, cache write: compile_time.py --jax-timers) and XLA's
#       logging timers kept (compile_where_*/timers.txt).
#   25. the prefill half's GEMMs on cuBLAS (--prefill-compiler-option xla_gpu_enable_triton_gemm=false,
#       fastblt.sampler.api.GPU_PREFILL_COMPILER_OPTIONS) against Triton's GEMM fusions (the default until
#       run 13, named explicitly since): ar's cold compile at batch 1
#       (an empty cache directory per process, alternated twice, JAX's stages timed), then ar at batch 1
#       and 32 with 64- and 4 000-byte prompts (prefill seconds and ms per byte) each way; a third way
#       also autotunes without XLA's correctness check of each candidate (xla_gpu_autotune_level=2,
#       both halves; the default is 4: init, reinit and check).
#   26. ar's program (batch 1) compiled as one module and as two halves at once (split_compile.py), each
#       truly cold (no cache directory at all), alternated twice: phase 18's 29.0 -> 9.4 s ran its modes
#       in that order while each process found the previous one's autotuning results.
#   27. the generation issue's full sweep: every method (ar, blt_s 4/8/16, blt_d and blt_dv with their
#       rules, B = 4/8, the uncached Hugging Face peer) at batch 1, 8, 32 and 128, 64- and 4 000-byte
#       prompts, BLT-1B then mid shapes. It takes longer than a device call: generate_speed.py --resume
#       goes on where the last call stopped, and rows committed under
#       experiments/results/generate_speed/sweep_<shape>.jsonl seed a fresh machine (rows of another
#       kind of device are measured again).
#   28. the RMSNorm kernel (fastblt.model.norm_kernel): first checked as Triton compiles it against XLA's
#       norm at blt_mid's and BLT-1B's shapes (kernel_check.py --kernels norm; exits 1 on a mismatch, and the train
#       rows run only after it passed here), then plain BLT and BLT-D-4 without and with it
#       (--fused-norm), plain BLT profiled both times: predicted ~1.5 ms off the step, in the norms'
#       backward (train_speed.md, run 9's leads).
#   24. plain BLT next to the PyTorch port (blt_mid, unprofiled): the ratio of the training target.
#   30. BLT-D's block rows on the key-range kernel (fastblt.model.range_attention,
#       block_rows.GPU_RANGE_KERNEL): first one decoder layer's block attention checked as Triton
#       compiles it against the XLA path and timed against today's tiles (range_check.py; exits 1 on a
#       mismatch, and the train rows run only after it passed here), then plain BLT, BLT-D-4 and
#       BLT-D-8 as today and BLT-D-4 and BLT-D-8 with the kernel (BLT-D-4 profiled), then plain BLT and
#       BLT-D-4 with both cross-attentions on it too (--cross-ranges; plain BLT profiled), then with
#       every attention of the step on it (--self-ranges: the stacks' self-attention off cuDNN).
#       Predicted: the tiles' pads and gathers (~0.35 ms per layer forward, 1.69 ms in one backward)
#       gone and the block attention at ~0.6x the scores without a bias read, a few ms of BLT-D-4's
#       41 ms over plain; the cross-attentions' gathers and segment sums gone (7.7 + 1.6 ms of plain
#       BLT's step in run 9, with its projections).
#   31. phase 30 in one device call: range_check without the tile sweep, then BLT-D-4 and plain BLT as
#       today and with the switches whose kernel range_check timed faster than today's path
#       (range_check.py --winners), unprofiled.
#   32. the key-range kernel's tiles, warps and pipeline stages (range_check.py's SWEEP) on the block
#       rows and on the decoder's and global model's self-attention, against cuDNN and the tiles: the
#       default ran the self-attention at ~0.7x cuDNN's rate in run 10; a setting that beats cuDNN
#       there would turn GPU_SELF_RANGES on (then measured in a train row).
#   29. the loop half's GEMMs on cuBLAS too (--compiler-option xla_gpu_enable_triton_gemm=false: both
#       halves; the prefill's has been cuBLAS since run 13), and no autotuning at all
#       (xla_gpu_autotune_level=0: XLA's default tiles): ar's cold compile at batch 1, the three
#       settings alternated twice as in 25 (their speed: 36). Runs 2-3 found Triton's one-row GEMM
#       fusions faster for decode steps (before the decode kernel and two-row products); what is left of
#       a cold start after run 13 is mostly the loop half. Run 16: 7.0 s on cuBLAS, 8.3 s untuned (whose
#       program runs 3.3x slower), 12.1-12.7 s today.
#   36. the speed half of 29: ar and blt_s8 at batch 1 and 32 with the loop half's GEMMs on Triton (today)
#       and on cuBLAS, alternated twice. Run 16 (one H100): the loop half compiled cold in 7.0 s on
#       cuBLAS against 12.1-12.7 s with Triton's GEMM fusions, but ar ran 1.23x slower per byte at batch
#       1 (1.61 against 1.31 ms), so the loop half stays on Triton (generate_speed.md run 16).
#   37. GEMM autotuning without its checks (xla_gpu_autotune_level=1: XLA's default 4 also fills the
#       buffers, refills them between candidates and checks each candidate's output against a
#       reference): ar's cold compile at batch 1, level 1 and the default alternated twice, one empty
#       cache directory each, then ar and blt_s8 at batch 1 and 32 each way. Run 16: the loop half's
#       Triton GEMM fusions hold a cold start at 15-16.5 s against 10.1 s on cuBLAS (whose bytes are
#       1.23x slower) and 11.8 s untuned (3.3x slower); if level 1 keeps the tuned kernels' speed and
#       cuts the tuning, it is the lead for the 10 s target.
#   38. the sampler's layers traced once per stack (fastblt.sampler.cached.TRACE_LAYERS_ONCE, on since
#       2026-12-06) against each layer traced on its own (--no-trace-layers-once): ar's cold compile at
#       batch 1 alternated twice (lower_s is what should move: 5.7-6.0 -> 3.5-3.7 s on the dev CPU),
#       then ar and blt_s8 at batch 1 and 32 each way (the step should not move: XLA inlines the calls).
#   39. BLT-D's own-block attention inside the key-range kernel (block_rows.OWN_BLOCK_IN_KERNEL: the own
#       block's cells as the kernel's second key set, one softmax) against today's XLA products per block
#       merged by log-sum-exp: first one decoder layer's block attention both ways as Triton compiles it,
#       checked against the XLA path and timed (range_check.py --sections block: rows "ranged" and
#       "ranged_own"; the train rows run only after it passed here), then BLT-D-4 and BLT-D-8 at
#       blt_mid, each way, alternated twice, after plain BLT for the ratio (one process per row,
#       unprofiled). Predicted ~5 ms off BLT-D-4's step (run 11, one H200: own-block products 3.9 ms,
#       their merge ~2 ms; the kernel at least ~0.6 ms more), more off BLT-D-8's; the losses must agree
#       to bf16 rounding. Run 14 (one H100): 3.3 ms off BLT-D-4's loop step, ~5 ms off BLT-D-8's; on since.
#   33. (gone) BLT-D's own-block attention in groups of blocks against one product per block: run 12
#       measured no gain (train_speed.md), the grouped form and this phase were removed.
#   35. plain BLT (blt_mid, unprofiled) with the one packed layout of 8 segments per row
#       (--segment-tiers 8: before) and with the host's smallest segment tier (attention.SEGMENT_TIERS;
#       the benchmark's batches need 3 segments, so 4), alternated twice. Run 13 (one H100): the loop's
#       step 78.9 -> 77.7 ms with the tiers. It also ran w1 and w3 as one stacked product: 1.3-1.5 ms
#       slower and 1.3 GB more, so that form was removed (train_speed.md run 13).
#   34. the global model's attention at 1 024 rows (attention_speed.py --cases global_1024): cuDNN without a
#       mask, causal, and causal within documents (today's path) next to JAX's Hopper kernel in Pallas'
#       Mosaic GPU dialect (attention_mgpu, FlashAttention-3's design) without a mask (forward and
#       backward) and causal (forward: its backward takes no causal mask). cuDNN runs the global
#       model's attention at ~20% of the matmul rate (9.8 ms of a 73.6 ms step in run 11); if the
#       kernel's rate is well above cuDNN's, a document-masked form of it is the lead for the 3x target.
#   40. BLT-D's diffusion passes reading the decoder window's clean rows (unmasking.block_logits, since
#       generate_speed.md run 20) instead of concatenating each layer's whole cache: ar, blt_d4 and
#       blt_d8 one step at BLT-1B, batch 8 and 32, 64- and 4 000-byte prompts. Run 20 (the before, one
#       H100): blt_d4's pass at batch 32 was 2.59x ar's at 4 000 bytes (6.71 / 2.59 ms) and 1.26x at 64
#       (2.13 / 1.69). Predicted: ~3.4 ms less per pass at batch 32 and 4 000 bytes (10 GB of copies),
#       so ~1.3x ar's there; nothing at 64 bytes.
#   41. where ar's decoder pass at batch 1 spends the 0.34 ms more that a 4 000-byte prompt costs (1.63
#       against 1.29 ms in run 20): ar profiled at batch 1 after a 64- and a 4 000-byte prompt (op
#       lists per component). The global model's attention over the prompt's ~1 040 patches reads
#       ~0.2 GB per global step, ~0.02 ms per byte at the copy rate, so most of the 0.34 ms is elsewhere.
#   42. the decode kernel's key splits sized for the window and sharing out the visible range (since
#       generate_speed.md run 21): ar, blt_s8 and blt_d4 at BLT-1B, batch 1 and 8, 64- and 4 000-byte
#       prompts. Run 21 (the before, one H100): ar's pass at batch 1 1.63 ms after 4 000 bytes against
#       1.31 after 64; its profile put ~0.26 ms per byte in the local models' split calls (scatters,
#       pads, transposes, the combine). Predicted: ar at batch 1 and 4 000 bytes ~1.40 ms; nothing at 64
#       bytes or at batch 8 (one split there already). Phase 41 again gives the profile after. The
#       local caches are rings since (below): the window's keys are read as before, so the prediction
#       stands.
#   43. where BLT-D's pass at batch 32 spends what a 4 000-byte prompt adds (run 21: blt_d4 4.68 against
#       2.14 ms after 64 bytes, where ar's pass goes from 1.69 to 2.59): blt_d4 profiled at batch 32
#       after a 64- and a 4 000-byte prompt.
#   44. the local models' ring caches (since generate_speed.md run 21): BLT-1B at batch 48 with 4 000-byte
#       prompts, ar and blt_s8. The caches there: the global model's 41.5 GB and the decoder's
#       cross-attention keys per patch slot 14.9 GB (one slot per buffer byte), the byte buffers 1.2 GB,
#       and the local self-attention caches 17.0 GB whole-buffer, 3.1 GB as 767-slot rings: 74.7 GB
#       before, out of memory next to the weights on an 80 GB card; 60.8 GB now. Predicted: the rows
#       run. (Batch 64 would still not fit: 81 GB of caches, most of it the patch slots.)
#   45. where the 1B-class train step's time goes (train_speed.md run 22, one H200: 315 ms, 15.9% MFU,
#       1.04x the port, against 32% and 2.45x at blt_mid; run 23, one H100, fused attention: 210.7 ms,
#       23.9%): phase 5's fastblt row profiled, on any card (95% of its memory for XLA).
#   46. the decode kernel's key blocks (generate_speed.md run 22: one program walks a 512-key window's
#       4-5 blocks of 128 in series, ~1.7 us each, so a windowed call costs 11.4 us after a 4 000-byte
#       prompt against 5.7 after 64): ar at BLT-1B, batch 1 and 8, 64- and 4 000-byte prompts, with
#       blocks of 128 keys (today), 256, and 512 in one pipeline stage (what a 64-wide head's 512-key
#       block needs in shared memory). Predicted: 256 or 512 take ~0.05-0.1 ms off ar's byte at batch 1
#       after 4 000 bytes (24 windowed calls per byte, ~2-4 us each), little at 64 bytes. First the
#       same with --no-split-writes (the before of the split calls' cache writes, since run 22: the
#       global model's calls at batch 1 over ~1 040 patches split, and XLA's scatters wrote their
#       caches, 0.077 ms per byte). Predicted: ~0.07 ms less per byte at batch 1 after 4 000 bytes
#       with the writes; nothing at 64 bytes or at batch 8 (one split there).
#   47. patch slots sized from the prompts' patches (fastblt.sampler.patch_slots, since generate_speed.md
#       run 22): ar and blt_d4 at BLT-1B, batch 128, 4 000-byte prompts, which ran out of memory on an H100
#       in run 20 (the global model's keys and values 110.8 GB, the decoder's cross-attention slots 39.9
#       GB, one slot per buffer byte). Now 1 344 slots a row instead of 4 225: 150.6 -> 47.9 GB. Predicted:
#       both rows run on an H100; the rows' compile time includes the count (one entropy-model forward).
#       Run 25 (one H100): both out of memory in JAX's default pool (75% of the card, 63.8 GB), against
#       ar's 68.8 GB of arguments (weights 9.3, state 59.5) and the count's 10.5 GB of temporaries. Now
#       with 95% of the card and the count in chunks of 64 KB of prompts (~1.3 GB): predicted to fit.
#   48. BLT-D's passes reading the decoder's cache in place on the decode kernel (the block's own keys
#       beside it: decode_attention_extra, since generate_speed.md run 22): decode_check.py first (the
#       "extra" layout compiled by Triton against the XLA path; nothing is measured if it fails), then
#       blt_d4 at BLT-1B, batch 8 and 32, 64- and 4 000-byte prompts, with --no-block-in-place (the
#       before: each layer gathers the window's rows and concatenates the block's keys) and without.
#       Run 22's profile (batch 32, 64 bytes): 0.25 of 1.94 ms per pass in those concatenations.
#       Predicted: ~0.2-0.3 ms less per pass at batch 32, ~0.1 at batch 8.
#   49. the 1B-class train row with less recomputation (model.remat_policy, since train_speed.md run 22):
#       phase 5's fastblt row with --remat minimal (every projection kept; norms, RoPE, attention and
#       SwiGLU recomputed) and --remat off. Run 22: 315.5 ms, 72.5 GB with full remat, which recomputes
#       every block's forward (a third more products than the MFU counts). Predicted: minimal ~10-15%
#       faster for ~10 GB more; off a little faster still if it fits. Needs an H200.
#   50. the 1B-class row on the XLA attention path (--attention-impl xla), the "before" of blt_1b's
#       attention_impl="auto" (since train_speed.md run 22; until then the 1B row ran no fused attention:
#       every float32 score tensor in HBM). Phase 5 is the "after". Needs an H200.
#   51. phases 5 and 50's fastblt rows without the port, on any card (95% of its memory for XLA; the
#       port needs more than an 80 GB card): the fused row (now the default), then the XLA path's.
#   52. two kernels for elementwise and scatter passes of blt_mid's step, off by default: each
#       layer's pre-norm backward taking its products' unsummed gradients and the residual's
#       (fastblt.model.prenorm, layers.GPU_NORM_PARTS); the encoder's patch max-pool without XLA's
#       two scatters (fastblt.model.pool_kernel, blt.GPU_POOL_KERNEL). First each kernel checked as
#       Triton compiles it against XLA's expression (kernel_check.py; a switch's rows run only after
#       its check passed here), then plain BLT at blt_mid as today, with both, and with each alone,
#       twice over. The checks ran on one H100 on 2026-12-07 (train_speed.md run 24): the norm
#       backward 187 vs 234 us (local) and 108 vs 148 us (global) per call, the pool 183 vs 686 us;
#       predicted ~1.4 ms and ~0.5 ms off the step. (SwiGLU's two-output gradient kernel ran no
#       faster than XLA's and is gone.)
#   53. blt_mid's global layers as one lax.scan over stacked parameters (model.scan_layers, off at
#       blt_mid) against today's unrolled layers, twice over: the 12 layers' 108 parameter leaves become
#       9, and the optimizer (544 launches, 3.5 ms), the gradient norm (335 reductions, 0.85 ms) and
#       the bf16 casts (170 launches, 0.94 ms) launch per leaf (run 11); the scan's slices and stacked
#       gradients cost copies. Predicted: within +-1 ms; a gain would make it blt_mid's default.
#       Measured on one H100 (train_speed.md run 25): scanned 91.5 against 77.5 ms, so it stays off.
#   54. BLT-1B (blt_1b scans its 25 global layers) scanned against unrolled, twice over, any card (95% of
#       its memory for XLA). Run 25's profile put ~14 ms of the 1B step in the scan: 6.1 ms of stacking,
#       2.7 of stacked gradients, 5.6 of in-loop float32 -> bfloat16 weight casts. The scan now stacks
#       the products' kernels already cast (train_speed.md, "Prepared after run 25"). Predicted:
#       scanned 201 -> ~195 ms per loop step; unrolled saves the stacking but keeps remat's casts, if
#       its memory holds; unrolled compiles longer.
# Phases 1-4 ran on 2026-12-05 (train_speed.md run 7, generate_speed.md run 8); 8, 12, 9 and 13's xla
# half ran the same day (generate_speed.md run 9: the decode kernel is now the default, so phase 8
# measures it too); 8, 15, 14, 16 and 18 ran on 2026-12-05 (generate_speed.md run 10); 8, 20, 19, 17,
# 13 and 7's first two rows ran the same day (generate_speed.md run 11, train_speed.md run 8); 22, 8,
# 15, 14, 21 and 7's first two rows on one H200, then 23 and 24 on one H100, the same evening
# (generate_speed.md run 12, train_speed.md run 9: phases 14 and 15 measured what is now the default);
# 25 without its level-2 speed row on one H200 (generate_speed.md run 13: cuBLAS prefill now the default);
# 28 and 31 on one H100 late that day (train_speed.md run 10: BLT-D's block rows and both cross-attentions
# on the key-range kernel are now the default; the norm kernel and self-attention on it stay off).
# 24, 32, 7 and the first call of 27 on one H200 on 2026-12-06 (train_speed.md run 11: no sweep setting
# changes a default; generate_speed.md run 14: 17 of the sweep's rows).
# 33, 5 (out of memory at 8 rows on the 80 GB card) and a call of 27 on one H100 later that day
# (train_speed.md run 12: the grouped own-block form is gone; generate_speed.md run 15).
# 35, 34, 29 (four of its six compiles), 36 and a call of 27 on one H100 on 2026-12-06, later
# (train_speed.md run 13: the tiers kept, the stacked feed-forward removed; generate_speed.md run 16:
# the loop half stays on Triton; 16 more sweep rows). 5 needs an H200.
# 38 and 37 on one H100 later that day (generate_speed.md run 17: the layers traced once stay on, 1 s
# less lowering; autotuning level 1 compiles no faster and is not used), then a call of 27 (run 18:
# 17 more sweep rows; phase 5 found no H200 in three tries).
# 39 and a call of 27 on one H100 on 2026-12-06, late (train_speed.md run 14: BLT-D's own block in the
# range kernel, now on; generate_speed.md run 19: 16 more sweep rows).
# 27 in three calls on one H100 on 2026-12-06, evening (generate_speed.md run 20: BLT-1B's sweep complete on
# the H100, blt_mid's first 36 rows; 5 skipped itself, no H200).
# 40, 41 and two calls of 27 on one H100 on 2026-12-06, night (generate_speed.md run 21: the window fix
# measured, ar's long-prompt profile, blt_mid's sweep but one row; 5 skipped itself, no H200).
# 42, 41, 43, then 5, 44 and a cut call of 27, then 26 and 6 on one H200 on 2026-12-06, late
# (generate_speed.md run 22: the key-split fix gains nothing; train_speed.md run 22: the 1B-class row).
# 51's first row on one H100 on 2026-12-07 after eleven tries that started no machine (train_speed.md
# run 23: the 1B-class row with fused attention, 210.7 ms per step); then two sessions started no machine
# in 27 tries but one, which ran 52's kernel checks alone on one H100 (train_speed.md run 24).
# 52, 53, 51, 48, 47, 46, 45, 51, 44 and 43 on one H100 on 2026-12-07, 08:35-09:03 UTC, six calls
# (train_speed.md run 25: the norm and pool kernels now on, scanned layers 18% slower at blt_mid, BLT-1B
# profiled; generate_speed.md run 25: in-place BLT-D passes confirmed, split writes and larger key blocks
# no gain, batch 48 fits, batch 128 does not).
# Next: 1 (blt_mid with the port in the same run, profiled: the 3x ratio with the norm and pool kernels
# on), 54 (BLT-1B's global layers unrolled against scanned) and 47 (batch 128 after 4 000 bytes) on any
# card; 5, 50 and 49 on an H200 (the 1B-class row with its port, the XLA row, remat settings); 27 on an
# H100 (blt_mid's last sweep row), 10, 11.
# Phases 30 and 31 clear the range switches where they measure "before".
# A device call's background jobs end with
# the call, so run in the foreground under a DEADLINE (below) and chain calls on the warm machine:
#
#   . experiments/benchmarks/gpu_env.sh && DEADLINE=$(( $(date +%s) + 540 )) \
#     PHASES="42 41 43 44 27 5 26 10 11 6" bash experiments/benchmarks/speed_gpu.sh OUT_DIR
#
# Each phase writes under OUT_DIR/<phase>; a phase whose directory holds a `done` marker is skipped,
# so the same command resumes on a machine that kept OUT_DIR. PHASES (default: all, in order) picks
# phases, in the order given. DEADLINE (epoch seconds, optional) fits the run into a device call: a
# phase is not started with under MIN_PHASE_S (default 120) seconds left and is stopped at DEADLINE,
# so the call keeps time to save what finished, and the next call resumes with the unfinished phase:
#
#   DEADLINE=$(( $(date +%s) + 540 )) PHASES="..." bash experiments/benchmarks/speed_gpu.sh OUT_DIR
#   tar czf $OUT/gpu.tgz OUT_DIR
set -uo pipefail
out=${1:?usage: speed_gpu.sh OUT_DIR}
mkdir -p "$out"
bench=experiments/benchmarks

phase() {  # name, command...
  local name=$1
  shift
  [ -e "$out/$name/done" ] && return 0
  local limit=()
  if [ -n "${DEADLINE:-}" ]; then
    local left=$((DEADLINE - $(date +%s)))
    if [ "$left" -lt "${MIN_PHASE_S:-120}" ]; then
      echo "[$name] not started: ${left} s left before DEADLINE" | tee -a "$out/log.txt"
      return 0
    fi
    limit=(timeout --kill-after=10 "$left")
  fi
  mkdir -p "$out/$name"
  echo "[$name] start $(date -u +%FT%TZ)" | tee -a "$out/log.txt"
  "${limit[@]}" "$@" > "$out/$name/stdout.txt" 2>&1
  local rc=$?
  echo "[$name] exit $rc $(date -u +%FT%TZ)" | tee -a "$out/log.txt"
  [ "$rc" -eq 0 ] && touch "$out/$name/done"
}

# Dropped after the run of 2026-12-05 (experiments/results/train_speed.md, run 7):
# --xla_gpu_cudnn_gemm_fusion_level=2 had not compiled the train step after 10 minutes, and jax
# 0.11.2's XLA does not know --xla_gpu_enable_llvm_module_compilation_parallelism (it exits at start).
declare -A flag_sets=(
  [default]=""
  [triton_gemm_any]="--xla_gpu_triton_gemm_any=true"
  [block_level_rewriter]="--xla_gpu_experimental_enable_fusion_block_level_rewriter=true"
  [threads16]="--xla_gpu_force_compilation_parallelism=16"
)

# A changed decode kernel is measured only after decode_check.py (phase 22) passed on this machine.
checked_kernel() {
  [ -e "$out/decode_check/done" ] && return 0
  echo "[$1] skipped: the decode kernel's check (phase 22) has not passed here" | tee -a "$out/log.txt"
  return 1
}

for p in ${PHASES:-1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 20 21 22 23 24 25 26 27 28 29 30 31 32 34 35 36 37 38 39 40 41 42 43 44}; do
  case $p in
  1) phase train python3 $bench/train_speed.py --shape mid --rows matmul blt blt_p8 blt_d4 torch \
       --profile blt blt_p8 --steps 20 --warmup 3 --timeout 300 --out "$out/train" ;;
  2) for name in triton_gemm_any block_level_rewriter; do
       XLA_FLAGS="$(echo ${XLA_FLAGS:-} ${flag_sets[$name]})" JAX_COMPILATION_CACHE_DIR="/tmp/cache-$name" \
         phase "flags_$name" python3 $bench/train_speed.py --shape mid --rows blt --steps 20 --warmup 3 \
         --timeout 200 --out "$out/flags_$name"
     done ;;
  3) for name in default threads16; do
       XLA_FLAGS="$(echo ${XLA_FLAGS:-} ${flag_sets[$name]})" JAX_COMPILATION_CACHE_DIR="/tmp/cold-$name" \
         phase "compile_$name" python3 $bench/compile_time.py --shape 1b --variants full --methods ar \
         --out "$out/compile_$name"
     done ;;
  4) phase gen python3 $bench/generate_speed.py --shape 1b --gen-bytes 128 --repeats 2 --methods ar \
       --batch 1 32 --profile ar:1 ar:32 --out "$out/gen" ;;
  5) # For an H200's 141 GB: on an 80 GB H100 both rows ran out of memory at 8 rows (train_speed.md
     # run 12) and at 4 (run 13: fastblt 16.9 GiB short, the port 11.5 GiB), so a smaller card skips it.
     # 4 rows: ~95 and ~89 GB by those shortfalls, where 8 rows may not fit 141 GB either; fastblt's
     # row compiled for ~250 s in run 12, so a row may take 420 s.
     gpu_mb=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
     if [ "${gpu_mb:-0}" -lt 100000 ]; then
       echo "[train1b] skipped: needs an H200 (${gpu_mb:-?} MiB here)" | tee -a "$out/log.txt"
     else
       phase train1b python3 $bench/train_speed.py --shape 1b --batch 4 --rows matmul blt torch --steps 10 \
         --warmup 2 --timeout 420 --out "$out/train1b"
     fi ;;
  6) python3 -c "import inspect; from jax._src.cudnn import fused_attention_stablehlo as fa; \
       print('dbias gated on a differentiable operand:', 'bias_is_differentiable' in inspect.getsource(fa.dot_product_attention))" \
       | tee -a "$out/log.txt"
     phase attention python3 $bench/attention_check.py --cases local global blt_d4 blt_d8 --out "$out/attention" ;;
  7) phase train_d python3 $bench/train_speed.py --shape mid --rows matmul blt blt_d4 blt_d8 torch \
       --profile blt blt_d4 --steps 20 --warmup 3 --timeout 300 --out "$out/train_d" ;;
  8) phase gen_ref python3 $bench/generate_speed.py --shape 1b --gen-bytes 128 --repeats 2 --methods ar \
       blt_s8 --batch 1 32 --profile ar:1 ar:32 blt_s8:32 --out "$out/gen_ref" ;;
  9) phase gen_rows1 python3 $bench/generate_speed.py --shape 1b --gen-bytes 128 --repeats 2 --methods ar \
       blt_s8 --batch 32 --min-query-rows 1 --profile ar:32 --out "$out/gen_rows1" ;;
  10) phase gen_cudnn python3 $bench/generate_speed.py --shape 1b --gen-bytes 128 --repeats 2 --methods ar \
       blt_s8 --batch 1 32 --attention-impl cudnn --profile ar:1 --out "$out/gen_cudnn" ;;
  11) phase gen_block_fusion python3 $bench/generate_speed.py --shape 1b --gen-bytes 128 --repeats 2 \
       --methods ar blt_s8 --batch 1 --profile ar:1 \
       --compiler-option xla_gpu_experimental_enable_fusion_block_level_rewriter=true \
       --out "$out/gen_block_fusion" ;;
  14) checked_kernel 14 || continue
      phase gen_direct python3 $bench/generate_speed.py --shape 1b --gen-bytes 128 --repeats 2 \
       --methods ar blt_s8 --batch 1 32 --decode-direct-rows 16 --no-decode-cache-write --profile ar:1 \
       --out "$out/gen_direct" ;;
  15) checked_kernel 15 || continue
      phase gen_direct_write python3 $bench/generate_speed.py --shape 1b --gen-bytes 128 --repeats 2 \
       --methods ar blt_s8 --batch 1 32 --decode-direct-rows 16 --decode-cache-write --profile ar:1 \
       --out "$out/gen_direct_write" ;;
  12) phase gen_decode_kernel python3 $bench/generate_speed.py --shape 1b --gen-bytes 128 --repeats 2 \
       --methods ar blt_s8 --batch 1 32 --decode-kernel decode --profile ar:1 ar:32 --out "$out/gen_decode_kernel" ;;
  16) mkdir -p "$out/compile_log"
      JAX_COMPILATION_CACHE_DIR=/tmp/cold-log TF_CPP_MIN_LOG_LEVEL=0 \
        TF_CPP_VMODULE=gpu_compiler=1,nvptx_compiler=1,compile_module_to_llvm_ir=1,gemm_fusion_autotuner=1,autotuner_pass=1,triton_fusion_emitter=1 \
        phase compile_log python3 $bench/compile_time.py --shape 1b --variants full --methods ar \
        --out "$out/compile_log"
      if [ -e "$out/compile_log/stdout.txt" ]; then
        grep -aE 'took|[0-9.]+ ?(s|ms|us)\b' "$out/compile_log/stdout.txt" | grep -avE '^\{' > "$out/compile_log/timers.txt"
        gzip -f "$out/compile_log/stdout.txt"
      fi ;;
  17) for caches in default all; do
        for job in "ar 1" "ar 32" "blt_s8 1"; do
          set -- $job
          if [ $caches = all ]; then export JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES=all; fi
          JAX_COMPILATION_CACHE_DIR=/tmp/xla-caches-$caches \
            phase "xla_caches_${caches}_$1_$2" python3 $bench/compile_time.py --shape 1b --variants full \
            --methods $1 --batch $2 --out "$out/xla_caches_$caches"
          unset JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES
        done
      done ;;
  18) for mode in full serial parallel; do
        phase "split_compile_$mode" env -u JAX_COMPILATION_CACHE_DIR python3 $bench/split_compile.py --shape 1b \
          --mode $mode --out "$out/split_compile"
      done ;;
  20) phase gen_write python3 $bench/generate_speed.py --shape 1b --gen-bytes 128 --repeats 2 \
       --methods ar blt_s8 --batch 1 32 --decode-direct-rows 0 --decode-cache-write --profile ar:1 \
       --out "$out/gen_write" ;;
  22) phase decode_check python3 $bench/decode_check.py --out "$out/decode_check" ;;
  21) # Both baselines again in this session (the sampler's path with a cache directory, the split
      # halves without one), then the three crossings; an empty cache directory for each process.
      rm -rf /tmp/why-*
      JAX_COMPILATION_CACHE_DIR=/tmp/why-sampler phase compile_why_sampler_cache python3 $bench/compile_time.py \
        --shape 1b --variants full --methods ar --out "$out/compile_why_sampler_cache"
      phase compile_why_split_nocache env -u JAX_COMPILATION_CACHE_DIR python3 $bench/split_compile.py --shape 1b \
        --mode parallel --out "$out/compile_why_split_nocache"
      phase compile_why_sampler_nocache env -u JAX_COMPILATION_CACHE_DIR python3 $bench/compile_time.py --shape 1b \
        --variants full --methods ar --out "$out/compile_why_sampler_nocache"
      JAX_COMPILATION_CACHE_DIR=/tmp/why-split phase compile_why_split_cache python3 $bench/split_compile.py \
        --shape 1b --mode parallel --out "$out/compile_why_split_cache"
      JAX_COMPILATION_CACHE_DIR=/tmp/why-none JAX_PERSISTENT_CACHE_ENABLE_XLA_CACHES=none \
        phase compile_why_no_xla_caches python3 $bench/compile_time.py --shape 1b --variants full \
        --methods ar --out "$out/compile_why_no_xla_caches" ;;
  25) rm -rf /tmp/prefill-*
      # Since run 13 cuBLAS is the prefill's default; "default" here names Triton's GEMMs, as it ran.
      cublas=(--prefill-compiler-option xla_gpu_enable_triton_gemm=false)
      level2=("${cublas[@]}" --compiler-option xla_gpu_autotune_level=2)
      for run in default_1 cublas_1 level2_1 default_2 cublas_2 level2_2; do
        opts=(--prefill-compiler-option xla_gpu_enable_triton_gemm=true)
        case $run in cublas_*) opts=("${cublas[@]}") ;; level2_*) opts=("${level2[@]}") ;; esac
        JAX_COMPILATION_CACHE_DIR=/tmp/prefill-$run phase "prefill_compile_$run" python3 $bench/compile_time.py \
          --shape 1b --variants full --methods ar --jax-timers "${opts[@]}" --out "$out/prefill_compile_$run"
      done
      for run in default cublas level2; do
        opts=(--prefill-compiler-option xla_gpu_enable_triton_gemm=true)
        case $run in cublas) opts=("${cublas[@]}") ;; level2) opts=("${level2[@]}") ;; esac
        phase "prefill_speed_$run" python3 $bench/generate_speed.py --shape 1b --gen-bytes 128 --repeats 2 \
          --methods ar --batch 1 32 --prompt-bytes 64 4000 "${opts[@]}" --out "$out/prefill_speed_$run"
      done ;;
  30) phase range_check python3 $bench/range_check.py --out "$out/range_check"
      if [ -e "$out/range_check/done" ]; then
        phase train_range_tiles python3 $bench/train_speed.py --shape mid --rows blt blt_d4 blt_d8 --steps 20 \
          --warmup 3 --timeout 300 --no-range-kernel --no-cross-ranges --out "$out/train_range_tiles"
        phase train_range_kernel python3 $bench/train_speed.py --shape mid --rows blt_d4 blt_d8 --profile blt_d4 \
          --steps 20 --warmup 3 --timeout 300 --range-kernel --no-cross-ranges --out "$out/train_range_kernel"
        phase train_range_cross python3 $bench/train_speed.py --shape mid --rows blt blt_d4 --profile blt \
          --steps 20 --warmup 3 --timeout 300 --range-kernel --cross-ranges --out "$out/train_range_cross"
        phase train_range_all python3 $bench/train_speed.py --shape mid --rows blt blt_d4 --steps 20 --warmup 3 \
          --timeout 300 --range-kernel --cross-ranges --self-ranges --out "$out/train_range_all"
      else
        echo "[train_range] skipped: the range kernel's check (range_check) has not passed here" | tee -a "$out/log.txt"
      fi ;;
  31) phase range_quick python3 $bench/range_check.py --no-sweep --out "$out/range_quick"
      if [ -e "$out/range_quick/done" ]; then
        won=$(python3 $bench/range_check.py --winners "$out/range_quick/range_check.jsonl")
        echo "[train_won] switches as range_check timed them: $won" | tee -a "$out/log.txt"
        phase train_won_before python3 $bench/train_speed.py --shape mid --rows blt_d4 blt --steps 20 \
          --warmup 3 --timeout 200 --no-range-kernel --no-cross-ranges --no-self-ranges --out "$out/train_won_before"
        phase train_won_after python3 $bench/train_speed.py --shape mid --rows blt_d4 blt \
          --steps 20 --warmup 3 --timeout 200 $won --out "$out/train_won_after"
      else
        echo "[train_won] skipped: the range kernel's check (range_quick) has not passed here" | tee -a "$out/log.txt"
      fi ;;
  32) for section in local block; do  # one process each: a call cut short keeps the finished one
        phase "range_sweep_$section" python3 $bench/range_check.py --sections $section --out "$out/range_sweep_$section"
      done ;;
  29) rm -rf /tmp/loop-*
      for run in default_1 cublas_1 notune_1 default_2 cublas_2 notune_2; do
        opts=()
        case $run in
          cublas_*) opts=(--compiler-option xla_gpu_enable_triton_gemm=false) ;;
          notune_*) opts=(--compiler-option xla_gpu_autotune_level=0) ;;
        esac
        JAX_COMPILATION_CACHE_DIR=/tmp/loop-$run phase "loop_compile_$run" python3 $bench/compile_time.py \
          --shape 1b --variants full --methods ar --jax-timers "${opts[@]}" --out "$out/loop_compile_$run"
      done
      ;;
  38) rm -rf /tmp/trace-*
      for run in once_1 each_1 once_2 each_2; do
        opts=()
        [ "${run%_*}" = each ] && opts=(--no-trace-layers-once)
        JAX_COMPILATION_CACHE_DIR=/tmp/trace-$run phase "trace_compile_$run" python3 $bench/compile_time.py \
          --shape 1b --variants full --methods ar --jax-timers "${opts[@]}" --out "$out/trace_compile_$run"
      done
      for run in once each; do
        opts=()
        [ $run = each ] && opts=(--no-trace-layers-once)
        phase "trace_speed_$run" python3 $bench/generate_speed.py --shape 1b --gen-bytes 128 --repeats 2 \
          --methods ar blt_s8 --batch 1 32 "${opts[@]}" --out "$out/trace_speed_$run"
      done ;;
  39) phase own_check python3 $bench/range_check.py --sections block --no-sweep --out "$out/own_check"
      if [ ! -e "$out/own_check/done" ]; then
        echo "[39] train rows skipped: range_check's block rows did not pass here" | tee -a "$out/log.txt"
        continue
      fi
      phase own_plain python3 $bench/train_speed.py --shape mid --rows blt --steps 20 --warmup 3 \
        --out "$out/own_plain"
      for run in kernel_1 merge_1 kernel_2 merge_2; do
        opts=(--no-own-in-kernel)
        [ "${run%_*}" = kernel ] && opts=(--own-in-kernel)
        phase "own_$run" python3 $bench/train_speed.py --shape mid --rows blt_d4 blt_d8 --steps 20 --warmup 3 \
          "${opts[@]}" --out "$out/own_$run"
      done ;;
  40) phase block_window python3 $bench/generate_speed.py --shape 1b --gen-bytes 128 --repeats 2 \
        --methods ar blt_d4 blt_d8_one --batch 8 32 --prompt-bytes 64 4000 --out "$out/block_window" ;;
  42) phase split_window python3 $bench/generate_speed.py --shape 1b --gen-bytes 128 --repeats 2 \
        --methods ar blt_s8 blt_d4 --batch 1 8 --prompt-bytes 64 4000 --out "$out/split_window" ;;
  43) for prompt in 64 4000; do
        phase "block_profile_$prompt" python3 $bench/generate_speed.py --shape 1b --gen-bytes 128 --repeats 2 \
          --methods blt_d4 --batch 32 --prompt-bytes $prompt --profile blt_d4:32 --out "$out/block_profile_$prompt"
      done ;;
  44) phase ring_batch48 python3 $bench/generate_speed.py --shape 1b --gen-bytes 128 --repeats 2 \
        --methods ar blt_s8 --batch 48 --prompt-bytes 4000 --out "$out/ring_batch48" ;;
  45) # Any card: 95% of its memory for XLA (the row took 72.5 GB of an H100's 80 in run 23).
      XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 phase train1b_profiled python3 $bench/train_speed.py --shape 1b \
        --batch 4 --rows blt --profile blt --steps 10 --warmup 2 --timeout 480 --out "$out/train1b_profiled" ;;
  49) gpu_mb=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
      if [ "${gpu_mb:-0}" -lt 100000 ]; then
        echo "[train1b_remat] skipped: needs an H200 (${gpu_mb:-?} MiB here)" | tee -a "$out/log.txt"
      else
        for remat in minimal off; do
          phase "train1b_remat_$remat" python3 $bench/train_speed.py --shape 1b --batch 4 --rows blt \
            --remat $remat --steps 10 --warmup 2 --timeout 300 --out "$out/train1b_remat_$remat"
        done
      fi ;;
  50) gpu_mb=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
      if [ "${gpu_mb:-0}" -lt 100000 ]; then
        echo "[train1b_xla] skipped: needs an H200 (${gpu_mb:-?} MiB here)" | tee -a "$out/log.txt"
      else
        phase train1b_xla python3 $bench/train_speed.py --shape 1b --batch 4 --rows blt --attention-impl xla \
          --steps 10 --warmup 2 --timeout 300 --out "$out/train1b_xla"
      fi ;;
  51) for impl in auto xla; do  # fastblt's rows alone (the port needs more than 80 GB)
        XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 phase "train1b_alone_$impl" python3 $bench/train_speed.py \
          --shape 1b --batch 4 --rows blt --attention-impl $impl --steps 10 --warmup 2 --timeout 300 \
          --out "$out/train1b_alone_$impl"
      done ;;
  52) phase norm_parts_check python3 $bench/kernel_check.py --kernels norm_parts --out "$out/norm_parts_check"
      phase pool_check python3 $bench/kernel_check.py --kernels pool --out "$out/pool_check"
      for run in base_1 all_1 parts_1 pool_1 base_2 all_2 parts_2 pool_2; do
        flags=(--no-norm-parts --no-pool-kernel)
        case ${run%_*} in
          all) flags=(--norm-parts --pool-kernel); check=all_checks
               [ -e "$out/norm_parts_check/done" ] && [ -e "$out/pool_check/done" ] \
                 && mkdir -p "$out/all_checks" && touch "$out/all_checks/done" ;;
          parts) flags=(--norm-parts --no-pool-kernel); check=norm_parts_check ;;
          pool) flags=(--no-norm-parts --pool-kernel); check=pool_check ;;
          *) check= ;;
        esac
        if [ -n "$check" ] && [ ! -e "$out/$check/done" ]; then
          echo "[train_kernels_$run] skipped: $check has not passed here" | tee -a "$out/log.txt"
          continue
        fi
        phase "train_kernels_$run" python3 $bench/train_speed.py --shape mid --rows blt --steps 20 --warmup 3 \
          --timeout 200 "${flags[@]}" --out "$out/train_kernels_$run"
      done ;;
  54) for run in on_1 off_1 on_2 off_2; do
        XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 phase "train1b_scan_$run" python3 $bench/train_speed.py --shape 1b \
          --batch 4 --rows blt --scan-layers "${run%_*}" --steps 10 --warmup 2 --timeout 300 \
          --out "$out/train1b_scan_$run"
      done ;;
  53) for run in off_1 on_1 off_2 on_2; do
        phase "train_scan_$run" python3 $bench/train_speed.py --shape mid --rows blt --steps 20 --warmup 3 \
          --timeout 200 --scan-layers "${run%_*}" --out "$out/train_scan_$run"
      done ;;
  46) for run in k128_scatters k128 k256 k512; do
        opts=()
        [ $run = k128_scatters ] && opts=(--no-split-writes)
        [ $run = k256 ] && opts=(--decode-block-k 256)
        [ $run = k512 ] && opts=(--decode-block-k 512 --decode-stages 1)
        phase "block_keys_$run" python3 $bench/generate_speed.py --shape 1b --gen-bytes 128 --repeats 2 \
          --methods ar --batch 1 8 --prompt-bytes 64 4000 "${opts[@]}" --out "$out/block_keys_$run"
      done ;;
  47) # 95% of the card for XLA (JAX's default pool is 75%: 63.8 of an H100's 85 GB, run 25)
      XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 phase slots_batch128 python3 $bench/generate_speed.py --shape 1b \
        --gen-bytes 128 --repeats 2 --methods ar blt_d4 --batch 128 --prompt-bytes 4000 --out "$out/slots_batch128" ;;
  48) phase decode_check_extra python3 $bench/decode_check.py --out "$out/decode_check_extra"
      if [ -e "$out/decode_check_extra/done" ]; then
        for run in gathered in_place; do
          opts=(--block-in-place)
          [ $run = gathered ] && opts=(--no-block-in-place)
          phase "block_$run" python3 $bench/generate_speed.py --shape 1b --gen-bytes 128 --repeats 2 \
            --methods blt_d4 --batch 8 32 --prompt-bytes 64 4000 "${opts[@]}" --out "$out/block_$run"
        done
      fi ;;
  41) for prompt in 64 4000; do
        phase "long_profile_$prompt" python3 $bench/generate_speed.py --shape 1b --gen-bytes 128 --repeats 2 \
          --methods ar --batch 1 --prompt-bytes $prompt --profile ar:1 --out "$out/long_profile_$prompt"
      done ;;
  37) rm -rf /tmp/tune-*
      for run in level1_1 default_1 level1_2 default_2; do
        opts=()
        [ "${run%_*}" = level1 ] && opts=(--compiler-option xla_gpu_autotune_level=1)
        JAX_COMPILATION_CACHE_DIR=/tmp/tune-$run phase "tune_compile_$run" python3 $bench/compile_time.py \
          --shape 1b --variants full --methods ar --jax-timers "${opts[@]}" --out "$out/tune_compile_$run"
      done
      for run in level1 default; do
        opts=()
        [ $run = level1 ] && opts=(--compiler-option xla_gpu_autotune_level=1)
        JAX_COMPILATION_CACHE_DIR=/tmp/tune-speed-$run phase "tune_speed_$run" python3 $bench/generate_speed.py \
          --shape 1b --gen-bytes 128 --repeats 2 --methods ar blt_s8 --batch 1 32 "${opts[@]}" \
          --out "$out/tune_speed_$run"
      done ;;
  36) for run in default_1 cublas_1 default_2 cublas_2; do
        opts=()
        [ "${run%_*}" = cublas ] && opts=(--compiler-option xla_gpu_enable_triton_gemm=false)
        phase "loop_speed_$run" python3 $bench/generate_speed.py --shape 1b --gen-bytes 128 --repeats 2 \
          --methods ar blt_s8 --batch 1 32 "${opts[@]}" --out "$out/loop_speed_$run"
      done ;;
  26) for run in full_1 parallel_1 full_2 parallel_2; do
        phase "split_cold_$run" env -u JAX_COMPILATION_CACHE_DIR python3 $bench/split_compile.py --shape 1b \
          --mode ${run%_*} --out "$out/split_cold_$run"
      done ;;
  27) for shape in 1b mid; do
        seed=experiments/results/generate_speed/sweep_$shape.jsonl
        if [ -e "$seed" ] && [ ! -e "$out/sweep_$shape/generate_speed.jsonl" ]; then
          mkdir -p "$out/sweep_$shape" && cp "$seed" "$out/sweep_$shape/generate_speed.jsonl"
        fi
        phase "sweep_$shape" python3 $bench/generate_speed.py --shape $shape --gen-bytes 128 --repeats 2 \
          --methods ar blt_s4 blt_s8 blt_s16 blt_d4 blt_d4_gamma blt_d4_one blt_d8 blt_d8_gamma blt_d8_one \
          blt_dv4 blt_dv8 hf --batch 1 8 32 128 --prompt-bytes 64 4000 --resume --out "$out/sweep_$shape"
      done ;;
  28) phase norm_check python3 $bench/kernel_check.py --kernels norm --out "$out/norm_check"
      if [ -e "$out/norm_check/done" ]; then
        for norm in xla fused; do
          flag=()
          [ $norm = fused ] && flag=(--fused-norm)
          phase "train_norm_$norm" python3 $bench/train_speed.py --shape mid --rows blt blt_d4 --profile blt \
            --steps 20 --warmup 3 --timeout 300 "${flag[@]}" --out "$out/train_norm_$norm"
        done
      else
        echo "[train_norm] skipped: the norm kernel's check (norm_check) has not passed here" | tee -a "$out/log.txt"
      fi ;;
  35) for run in tiers8_1 tiers_1 tiers8_2 tiers_2; do
        flags=()
        [ "${run%_*}" = tiers8 ] && flags=(--segment-tiers 8)
        phase "train_tiers_$run" python3 $bench/train_speed.py --shape mid --rows blt --steps 20 --warmup 3 \
          --timeout 200 "${flags[@]}" --out "$out/train_tiers_$run"
      done ;;
  34) phase attention_mgpu python3 $bench/attention_speed.py --cases global_1024 \
        --out "$out/attention_mgpu/attention_speed.jsonl" ;;
  24) phase train_port python3 $bench/train_speed.py --shape mid --rows blt torch --steps 20 --warmup 3 \
       --timeout 200 --out "$out/train_port" ;;
  23) rm -rf /tmp/where-*
      for run in nocache_1 cache_1 nocache_2 cache_2; do
        cache=(env -u JAX_COMPILATION_CACHE_DIR)  # unset: an empty value still caches autotuning (cwd)
        case $run in cache_*) cache=(env JAX_COMPILATION_CACHE_DIR=/tmp/where-$run) ;; esac
        TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=gpu_compiler=1,nvptx_compiler=1,gemm_fusion_autotuner=1,autotuner_pass=1 \
          phase "compile_where_$run" "${cache[@]}" python3 $bench/compile_time.py --shape 1b --variants full \
          --methods ar --jax-timers --out "$out/compile_where_$run"
        if [ -e "$out/compile_where_$run/stdout.txt" ]; then
          grep -aE 'took|[0-9.]+ ?(s|ms|us)\b' "$out/compile_where_$run/stdout.txt" | grep -avE '^\{' \
            > "$out/compile_where_$run/timers.txt"
          gzip -f "$out/compile_where_$run/stdout.txt"
        fi
      done ;;
  13) for kernel in xla decode; do
        phase "gen_long_$kernel" python3 $bench/generate_speed.py --shape 1b --gen-bytes 128 --repeats 2 \
          --methods ar --batch 1 --prompt-bytes 4000 16000 --decode-kernel $kernel --out "$out/gen_long_$kernel"
      done ;;
  esac
done
echo "all phases ended $(date -u +%FT%TZ)" | tee -a "$out/log.txt"
