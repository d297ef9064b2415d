"""Streaming enhancement: arbitrary chunks of samples in, enhanced samples out, hop by hop.

The network runs on the frames each chunk completes, with its state carried explicitly: the
STFT memories, both feature normalisation states, every causal convolution's past frames and
every GRU's hidden state (`df_mlx.layers.StreamState`). The lookahead is honoured by waiting:
a frame is output once the `conv_lookahead` later feature frames (and `df_lookahead` later
spectrum frames) have arrived. The concatenated output equals offline `enhance(...,
pad=False)` sample for sample, and after `flush()` it equals `enhance(..., pad=True)` delayed
by `fft_size - hop_size` samples.
"""

import copy
import os
from typing import Optional

import mlx.core as mx
import numpy as np

from df_mlx import _native
from df_mlx.layers import GRU, ConstantPad2d, StreamState, pad_axis
from df_mlx.libdf import DF, erb, erb_norm, unit_norm
from df_mlx.utils import get_norm_alpha


def _streamable_layers(model):
    """Layers that carry state across calls: GRUs and causal (past-only) time pads."""
    for name, module in model.named_modules():
        if isinstance(module, GRU):
            yield module
        elif isinstance(module, ConstantPad2d) and name != "pad_feat":
            _, _, top, bottom = module.padding
            if top > 0 and bottom == 0:
                yield module
            elif top != 0 or bottom != 0:
                raise ValueError(f"{name}: a time padding of {module.padding} cannot stream")


# enhance() and `dfmlx enhance` run longer inputs through StreamingEnhancer in blocks of this
# length, which gives the whole-signal result within float32 rounding (tests/test_streaming.py)
# in bounded memory;
# whole, a minute's feature maps are 150 MB each, and MLX's CPU build, which keeps only 32 MB
# of freed buffers for reuse, takes fresh pages from the OS for every op (25 % slower per frame).
BLOCK_SECONDS = 10.0

# Calls of up to this many frames run the network as one compiled MLX graph: a 10 ms hop is
# ~450 small ops (~220 once compiled) whose fixed cost dominates, and replaying the compiled
# graph fuses them and skips building it in Python (about 20 % less time per hop on a 2-core
# x86 CPU, identical output).
# Longer calls are dominated by the work itself and would each trace their own graph.
COMPILED_MAX_FRAMES = 4


def run_on_one_core(cpu: Optional[int] = None) -> int:
    """Pin every thread of this process, MLX's CPU stream worker included, to one CPU (by
    default the first this process may use) and return it; threads started later inherit it.
    MLX runs each op on its stream's worker thread, so a hop of ~220 small ops, with caller and
    worker on different cores, pays cross-core wake-ups (on a 2-core VM a DFN3 hop took 2.8-3.3
    ms so and 2.0 ms on one core). For real-time, hop-by-hop use; Linux only."""
    if not hasattr(os, "sched_setaffinity"):
        raise OSError("run_on_one_core needs os.sched_setaffinity (Linux)")
    cpu = min(os.sched_getaffinity(0)) if cpu is None else cpu
    for tid in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(tid), {cpu})
    return cpu


def why_not_streamable(model) -> Optional[str]:
    """Why `model` cannot stream, or None when it can."""
    if not hasattr(model, "estimate") or not hasattr(model, "apply_stages"):
        return f"{type(model).__module__} has no streaming support (DeepFilterNet3 has)"
    if not model.run_erb:
        return "streaming needs the ERB stage (nb_df + 1 < fft_size // 2 + 1)"
    if getattr(model, "lsnr_droput", False):
        return "LSNR_DROPOUT drops frames by their future-dependent SNR and cannot stream"
    return None


class StreamingEnhancer:
    """Enhance a signal given chunk by chunk: `process(chunk [C, n])` returns the enhanced
    samples that are final so far (a multiple of hop_size per call), `flush()` the rest.
    `compile_hops` runs calls of up to COMPILED_MAX_FRAMES frames as one compiled graph (for
    hop-by-hop use; its first call in a process loads or builds MLX's fused kernels)."""

    def __init__(self, model, df_state: DF, atten_lim_db: Optional[float] = None, compile_hops: bool = True):
        reason = why_not_streamable(model)
        if reason:
            raise ValueError(reason)
        model.eval()
        self.model = model
        self.df = copy.deepcopy(df_state)  # parameters; each channel streams through its own copy
        self.hop, self.n_fft = self.df.hop_size(), self.df.fft_size()
        self.alpha = get_norm_alpha(False)
        self.conv_la = model.conv_lookahead
        self.df_la = model.df_lookahead
        self.df_past = model.df_order - 1 - model.df_lookahead
        self.lim = 10 ** (-abs(atten_lim_db) / 20) if atten_lim_db else None
        self.layers = list(_streamable_layers(model))
        # The model's parameters are inputs of the compiled graph, so updated weights count.
        self._estimate_compiled = mx.compile(self._estimate_with_states, inputs=model.state) if compile_hops \
            else self._estimate_with_states
        # The mask, deep filter and post-filter of a few frames are ~80 more small ops: compiled too.
        self._apply_compiled = mx.compile(self._apply_stages, inputs=model.state) if compile_hops \
            else self._apply_stages
        self.reset()

    @property
    def latency(self) -> int:
        """Samples from a sample's arrival to the output of its enhanced version."""
        return self.n_fft - self.hop + self.conv_la * self.hop + (self.hop - 1)

    def reset(self):
        self.channel_states = None  # one STFT state per channel: libdf's is shared across channels
        self.layer_states = [None] * len(self.layers)  # each layer's state after the last call
        self.pending = None  # samples of an incomplete hop
        self.erb_state = self.unit_state = None
        self.features_seen = 0  # feature frames received (the first conv_la are skipped)
        self.spec = None  # [C, n, F] complex: spectrum frames from `spec_start` on
        self.spec_start = -self.df_past
        self.m = self.coefs = None  # estimates for frames `next_out` onwards
        self.next_out = 0

    def process(self, chunk) -> np.ndarray:
        chunk = np.asarray(chunk, dtype=np.float32)
        if chunk.ndim != 2:
            raise ValueError(f"chunks must be [C, n] arrays, got shape {chunk.shape}")
        x = chunk if self.pending is None else np.concatenate([self.pending, chunk], axis=1)
        full = x.shape[1] // self.hop * self.hop
        self.pending = x[:, full:]
        if self.channel_states is None:
            self.channel_states = [copy.deepcopy(self.df) for _ in range(x.shape[0])]
            for state in self.channel_states:
                state.reset()
        if len(self.channel_states) != x.shape[0]:
            raise ValueError(f"the stream has {len(self.channel_states)} channels, got a chunk with {x.shape[0]}")
        return self._frames(np.concatenate([st.analysis(x[c : c + 1, :full], reset=False)
                                            for c, st in enumerate(self.channel_states)]))

    def flush(self, pad: bool = True) -> np.ndarray:
        """Finish as offline `enhance(pad=True)` does: fft_size zero samples, then the
        conv_lookahead zero feature frames; or as `enhance(pad=False)`: the zero feature
        frames only (the incomplete last hop dropped). The stream is reset afterwards."""
        channels = self.pending.shape[0] if self.pending is not None else 1
        out = [self.process(np.zeros((channels, self.n_fft if pad else 0), np.float32))]
        out.append(self._estimate_and_output(None, extra_zero_frames=self.conv_la, final=True))
        self.reset()
        return np.concatenate(out, axis=1)

    def _frames(self, spec: np.ndarray) -> np.ndarray:
        if spec.shape[1] == 0:
            return np.zeros((spec.shape[0], 0), np.float32)
        if self.spec is None:
            past = np.zeros((spec.shape[0], self.df_past, spec.shape[2]), np.complex64)
            self.spec = past
        self.spec = np.concatenate([self.spec, spec], axis=1)
        feat_erb, self.erb_state = erb_norm(erb(spec, self.df.erb_widths()), self.alpha, self.erb_state,
                                            return_state=True)
        feat_spec, self.unit_state = unit_norm(spec[..., : self.model.nb_df], self.alpha, self.unit_state,
                                               return_state=True)
        skip = max(0, min(self.conv_la - self.features_seen, spec.shape[1]))
        self.features_seen += spec.shape[1]
        feats = (feat_erb[:, skip:], feat_spec[:, skip:])
        return self._estimate_and_output(feats)

    def _estimate_and_output(self, feats, extra_zero_frames: int = 0, final: bool = False) -> np.ndarray:
        if feats is None:
            c, e = self.spec.shape[0], len(self.df.erb_widths())
            feats = (np.zeros((c, extra_zero_frames, e), np.float32),
                     np.zeros((c, extra_zero_frames, self.model.nb_df), np.complex64))
        feat_erb, feat_spec = feats
        if feat_erb.shape[1] > 0:
            inputs = (mx.array(feat_erb[..., None]), mx.array(_as_real(feat_spec)))
            # The first call starts from no state; later short ones replay the compiled graph.
            started = all(state is not None for state in self.layer_states)
            run = self._estimate_compiled if started and feat_erb.shape[1] <= COMPILED_MAX_FRAMES \
                else self._estimate_with_states
            m, coefs, *self.layer_states = run(*inputs, *self.layer_states)
            self.m = m if self.m is None else mx.concatenate([self.m, m], axis=2)
            if self.model.run_df:
                self.coefs = coefs if self.coefs is None else mx.concatenate([self.coefs, coefs], axis=2)
        return self._output(final)

    def _estimate_with_states(self, feat_erb: mx.array, feat_spec: mx.array, *states):
        """model.estimate with the layer states passed in and returned (-> m, coefs, *states).
        The states are lent to the layers for this call only: the model stays stateless for
        offline use and for other streams on the same model."""
        holders = [StreamState() for _ in self.layers]
        for layer, holder, state in zip(self.layers, holders, states):
            holder.state = state
            layer.stream = holder
        try:
            with _native.without_gradients():  # inference only: fewer ops per hop
                m, _, coefs = self.model.estimate(feat_erb, feat_spec, feat_erb.shape[1])
        finally:
            for layer in self.layers:
                layer.stream = None
        return (m, coefs, *[holder.state for holder in holders])

    def _apply_stages(self, spec: mx.array, m: mx.array, *coefs: mx.array) -> mx.array:
        """model.apply_stages (coefs only where the DF stage runs: a compiled graph takes arrays)."""
        with _native.without_gradients():
            return self.model.apply_stages(spec, m, coefs[0] if coefs else None)

    def _output(self, final: bool) -> np.ndarray:
        """Apply mask and deep filter to every frame whose estimates and lookahead frames exist."""
        c = self.spec.shape[0]
        known = self.spec_start + self.spec.shape[1]  # spectrum frames received
        ready = 0 if self.m is None else self.m.shape[2]
        n = ready if final else min(ready, known - self.df_la - self.next_out)
        if n <= 0:
            return np.zeros((c, 0), np.float32)
        lo = self.next_out - self.spec_start - self.df_past
        window = self.spec[:, lo : lo + self.df_past + n + self.df_la]
        if window.shape[1] < self.df_past + n + self.df_la:  # the end of the signal
            window = np.pad(window, ((0, 0), (0, self.df_past + n + self.df_la - window.shape[1]), (0, 0)))
        spec_w = mx.array(_as_real(window))[:, None]
        pad = (self.df_past, self.df_la)
        # hop by hop, every estimate is used at once: no slice of the pending ones
        m = pad_axis(self.m if n == ready else self.m[:, :, :n], 2, *pad)
        coefs = self.coefs
        if self.model.run_df:
            coefs = pad_axis(coefs if n == ready else coefs[:, :, :n], 2, *pad)
        apply = self._apply_compiled if n <= COMPILED_MAX_FRAMES else self._apply_stages
        out = np.array(apply(spec_w, m, *([coefs] if self.model.run_df else [])))
        out = np.ascontiguousarray(out[:, 0, self.df_past : self.df_past + n]).view(np.complex64)[..., 0]
        if self.lim is not None:
            out = window[:, self.df_past : self.df_past + n] * self.lim + out * (1 - self.lim)
        self.m = None if n == ready else self.m[:, :, n:]
        if self.model.run_df:
            self.coefs = None if n == ready else self.coefs[:, :, n:]
        self.next_out += n
        drop = self.next_out - self.df_past - self.spec_start
        self.spec, self.spec_start = self.spec[:, drop:], self.spec_start + drop
        out = out.astype(np.complex64, copy=False)
        return np.concatenate([st.synthesis(out[c : c + 1], reset=False) for c, st in enumerate(self.channel_states)])


def _as_real(x: np.ndarray) -> np.ndarray:
    """complex [...] -> float32 [..., 2] (real, imag): complex64's own memory layout."""
    return np.ascontiguousarray(x, dtype=np.complex64).view(np.float32).reshape(*x.shape, 2)
