//! Simulcast layer selection, as pure functions (no I/O, no clock, no str0m types).
//!
//! A published video track has one or more layers, ordered from lowest to highest (for browser
//! simulcast: rid `q`, `h`, `f`; a track without simulcast has one layer). Per subscriber, the SFU
//! decides which layer of each subscribed track to forward:
//!
//! 1. [`allocate`] splits the subscriber's downstream budget (its bandwidth estimate minus what
//!    its audio needs) over its video subscriptions: first the lowest active layer of every
//!    wanted track, whatever the budget (the estimate chooses layers; it never turns video off,
//!    only the subscriber does, by pausing), then upgrades one step at a time, round robin in
//!    the order given (callers put the most important first), while the budget holds and the
//!    layer does not exceed what the subscriber asked for. A track that is paused or has no
//!    active layer gets no video (`None`).
//! 2. [`forward`] applies the choice frame by frame: the subscriber keeps receiving its current
//!    layer until a keyframe of the target layer arrives, and switches on that keyframe (a
//!    decoder can only start a new spatial layer on a keyframe). A target of `None` stops video
//!    at once.
//! 3. [`temporal_caps`] and [`temporal_forward`]: a track that does not fit in the budget even at
//!    its lowest layer is cut to its temporal base layer at once (no keyframe needed), and the
//!    higher temporal layers come back at their next sync frame.

/// What the SFU knows of one layer of a published video track.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerInfo {
    /// Measured (or, before any measurement, nominal) bitrate in bits per second.
    pub bitrate_bps: u64,
    /// Frame size from the layer's last keyframe; 0 when not known yet.
    pub width: u32,
    pub height: u32,
    /// Whether the publisher currently sends this layer (browsers drop layers under their own
    /// bandwidth limits).
    pub active: bool,
}

/// One video subscription of a subscriber, as input to [`allocate`].
#[derive(Debug, Clone, Copy)]
pub struct VideoWant<'a> {
    /// The track's layers, lowest first.
    pub layers: &'a [LayerInfo],
    /// Largest frame size the subscriber wants (its tile size); `None`: no limit.
    pub max_size: Option<(u32, u32)>,
    /// `false` when the subscriber paused this track's video.
    pub enabled: bool,
}

/// The highest layer index the subscriber's requested size calls for: the lowest active layer
/// at least as large as the request in both dimensions, or the highest active layer if none is
/// (or if the request is `None`). Layers of unknown size count as large enough only when no
/// layer below is known to be. `None` if no layer is active.
pub fn size_cap(layers: &[LayerInfo], max_size: Option<(u32, u32)>) -> Option<usize> {
    let highest = layers.iter().rposition(|l| l.active)?;
    let Some((max_w, max_h)) = max_size else {
        return Some(highest);
    };
    layers
        .iter()
        .enumerate()
        .filter(|(_, l)| l.active)
        .find(|(_, l)| l.width == 0 || (l.width >= max_w && l.height >= max_h))
        .map(|(i, _)| i)
        .or(Some(highest))
}

/// Chooses one layer (index into `layers`) or none for every want; see the module docs.
pub fn allocate(budget_bps: u64, wants: &[VideoWant<'_>]) -> Vec<Option<usize>> {
    let caps: Vec<Option<usize>> = wants
        .iter()
        .map(|w| {
            if w.enabled {
                size_cap(w.layers, w.max_size)
            } else {
                None
            }
        })
        .collect();
    let mut chosen: Vec<Option<usize>> = vec![None; wants.len()];
    let mut remaining = budget_bps;

    // Everyone wanted gets its lowest active layer, even past the budget: the estimate picks
    // layers, it never turns video off (a subscriber turns it off by pausing).
    for (i, want) in wants.iter().enumerate() {
        if caps[i].is_none() {
            continue;
        }
        let Some(lowest) = want.layers.iter().position(|l| l.active) else {
            continue;
        };
        remaining = remaining.saturating_sub(want.layers[lowest].bitrate_bps);
        chosen[i] = Some(lowest);
    }

    // Then one step up at a time, round robin, while it fits.
    loop {
        let mut upgraded = false;
        for (i, want) in wants.iter().enumerate() {
            let (Some(current), Some(cap)) = (chosen[i], caps[i]) else {
                continue;
            };
            if current >= cap {
                continue;
            }
            let Some(next) = (current + 1..=cap).find(|&j| want.layers[j].active) else {
                continue;
            };
            let extra = want.layers[next]
                .bitrate_bps
                .saturating_sub(want.layers[current].bitrate_bps);
            if extra <= remaining {
                remaining -= extra;
                chosen[i] = Some(next);
                upgraded = true;
            }
        }
        if !upgraded {
            return chosen;
        }
    }
}

/// The video bitrate of an [`allocate`] result plus its cheapest one-step upgrade: what the
/// subscriber's link must carry before the next layer up can be chosen (`None`: every track is
/// at the best layer it wants, nothing to grow into). The SFU keeps the subscriber's outgoing
/// rate (media plus padding, capped by the estimate) at this level, so that the bandwidth
/// estimate can climb back after a drop: an estimator that only sees a low-layer stream well
/// below its estimate has no evidence that more would fit, and stays where it is.
pub fn next_step_bps(wants: &[VideoWant<'_>], chosen: &[Option<usize>]) -> Option<u64> {
    let current: u64 = wants
        .iter()
        .zip(chosen)
        .map(|(w, c)| c.map_or(0, |i| w.layers[i].bitrate_bps))
        .sum();
    let extra = wants
        .iter()
        .zip(chosen)
        .filter_map(|(w, c)| {
            let current = (*c)?;
            let cap = size_cap(w.layers, w.max_size).filter(|_| w.enabled)?;
            let next = (current + 1..=cap).find(|&j| w.layers[j].active)?;
            Some(
                w.layers[next]
                    .bitrate_bps
                    .saturating_sub(w.layers[current].bitrate_bps),
            )
        })
        .min()?;
    Some(current.saturating_add(extra))
}

/// What to do with one incoming frame of a subscribed track.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forward<L> {
    /// Whether to send this frame to the subscriber.
    pub send: bool,
    /// The layer the subscriber is on after this frame.
    pub current: Option<L>,
    /// `true` when this frame starts a new layer (the caller rebases timestamps).
    pub switched: bool,
}

/// Decides one frame: `current` is the layer the subscriber is receiving (`None` before its first
/// keyframe), `target` the layer [`allocate`] chose, `layer` and `keyframe` describe the frame.
pub fn forward<L: PartialEq + Copy>(
    current: Option<L>,
    target: Option<L>,
    layer: L,
    keyframe: bool,
) -> Forward<L> {
    let Some(target) = target else {
        return Forward {
            send: false,
            current: None,
            switched: false,
        };
    };
    if layer == target && current != Some(target) {
        if keyframe {
            return Forward {
                send: true,
                current: Some(target),
                switched: true,
            };
        }
        return Forward {
            send: false,
            current,
            switched: false,
        };
    }
    Forward {
        send: current == Some(layer),
        current,
        switched: false,
    }
}

/// Temporal-layer caps that go with an [`allocate`] result: walking the wants in order, a track
/// whose chosen layer no longer fits in what is left of the budget is capped to its temporal
/// base layer (`Some(0)`: VP8 TL0 only, a fraction of the frame rate and bitrate), at once and
/// without waiting for a keyframe. `None`: no cap.
pub fn temporal_caps(
    budget_bps: u64,
    wants: &[VideoWant<'_>],
    chosen: &[Option<usize>],
) -> Vec<Option<u8>> {
    let mut remaining = budget_bps;
    wants
        .iter()
        .zip(chosen)
        .map(|(want, choice)| {
            let cost = choice.map_or(0, |i| want.layers[i].bitrate_bps);
            if cost <= remaining {
                remaining -= cost;
                None
            } else {
                remaining = 0;
                choice.map(|_| 0)
            }
        })
        .collect()
}

/// Whether to send one frame of a temporally layered stream (VP8 with temporal layers), and the
/// highest temporal layer the subscriber is decoding afterwards (`synced`).
///
/// Frames above `cap` are dropped (a temporal base never references them, so this is safe at
/// any moment). A layer above `synced` is only picked up again at a keyframe or at a frame
/// flagged as a layer sync point (it references nothing of its own layer).
pub fn temporal_forward(
    cap: Option<u8>,
    synced: u8,
    temporal: u8,
    sync: bool,
    keyframe: bool,
) -> (bool, u8) {
    let cap = cap.unwrap_or(u8::MAX);
    let synced = synced.min(cap);
    if keyframe {
        return (true, cap);
    }
    if temporal > cap {
        return (false, synced);
    }
    if temporal <= synced {
        return (true, synced);
    }
    if sync {
        return (true, temporal);
    }
    (false, synced)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(kbps: u64, width: u32, height: u32) -> LayerInfo {
        LayerInfo {
            bitrate_bps: kbps * 1000,
            width,
            height,
            active: true,
        }
    }

    fn three() -> [LayerInfo; 3] {
        [
            layer(150, 320, 180),
            layer(500, 640, 360),
            layer(1500, 1280, 720),
        ]
    }

    fn want(layers: &[LayerInfo]) -> VideoWant<'_> {
        VideoWant {
            layers,
            max_size: None,
            enabled: true,
        }
    }

    #[test]
    fn one_track_gets_the_best_layer_the_budget_holds() {
        let l = three();
        assert_eq!(allocate(5_000_000, &[want(&l)]), vec![Some(2)]);
        assert_eq!(allocate(1_500_000, &[want(&l)]), vec![Some(2)]);
        assert_eq!(allocate(1_499_999, &[want(&l)]), vec![Some(1)]);
        assert_eq!(allocate(500_000, &[want(&l)]), vec![Some(1)]);
        assert_eq!(allocate(200_000, &[want(&l)]), vec![Some(0)]);
        // Not even the lowest layer fits: still the lowest layer.
        assert_eq!(allocate(100_000, &[want(&l)]), vec![Some(0)]);
        assert_eq!(allocate(0, &[want(&l)]), vec![Some(0)]);
    }

    #[test]
    fn the_next_step_is_the_cheapest_upgrade_over_what_is_chosen() {
        let l = three();
        // One track on q: the next step is h (500k in all).
        assert_eq!(next_step_bps(&[want(&l)], &[Some(0)]), Some(500_000));
        // On f: nothing to grow into.
        assert_eq!(next_step_bps(&[want(&l)], &[Some(2)]), None);
        // Two tracks, q and h: the cheaper upgrade is q -> h (+350k) over 650k.
        let wants = [want(&l), want(&l)];
        assert_eq!(
            next_step_bps(&wants, &[Some(0), Some(1)]),
            Some(650_000 + 350_000)
        );
        // A size request or a pause ends the growth of that track; inactive layers are skipped.
        let mut small = want(&l);
        small.max_size = Some((320, 180));
        assert_eq!(next_step_bps(&[small], &[Some(0)]), None);
        let mut paused = want(&l);
        paused.enabled = false;
        assert_eq!(next_step_bps(&[paused], &[None]), None);
        let mut gap = three();
        gap[1].active = false;
        assert_eq!(next_step_bps(&[want(&gap)], &[Some(0)]), Some(1_500_000));
    }

    #[test]
    fn requested_size_caps_the_layer() {
        let l = three();
        let mut w = want(&l);
        w.max_size = Some((320, 180));
        assert_eq!(allocate(10_000_000, &[w]), vec![Some(0)]);
        w.max_size = Some((400, 200));
        assert_eq!(allocate(10_000_000, &[w]), vec![Some(1)]);
        w.max_size = Some((1920, 1080));
        assert_eq!(allocate(10_000_000, &[w]), vec![Some(2)]);
        // A tiny tile still gets the lowest layer, not nothing.
        w.max_size = Some((16, 16));
        assert_eq!(allocate(10_000_000, &[w]), vec![Some(0)]);
    }

    #[test]
    fn paused_or_inactive_gets_nothing_and_inactive_layers_are_skipped() {
        let l = three();
        let mut w = want(&l);
        w.enabled = false;
        assert_eq!(allocate(10_000_000, &[w]), vec![None]);

        let mut l = three();
        l[1].active = false;
        assert_eq!(allocate(1_000_000, &[want(&l)]), vec![Some(0)]);
        assert_eq!(allocate(2_000_000, &[want(&l)]), vec![Some(2)]);
        for x in &mut l {
            x.active = false;
        }
        assert_eq!(allocate(10_000_000, &[want(&l)]), vec![None]);
    }

    #[test]
    fn budget_is_shared_lowest_first_then_round_robin() {
        let l = three();
        let wants = [want(&l), want(&l), want(&l)];
        // 3 × q = 450k; with 1 Mbps, 550k left: one upgrade to h (+350k), 200k left.
        assert_eq!(allocate(1_000_000, &wants), vec![Some(1), Some(0), Some(0)]);
        // 3 × h = 1.5 Mbps.
        assert_eq!(allocate(1_500_000, &wants), vec![Some(1), Some(1), Some(1)]);
        // Not even three q fit: all get q, none more.
        assert_eq!(allocate(300_000, &wants), vec![Some(0), Some(0), Some(0)]);
        // Upgrades go in priority order: with 450k + 350k, only the first reaches h.
        assert_eq!(allocate(800_000, &wants), vec![Some(1), Some(0), Some(0)]);
        assert_eq!(allocate(100_000_000, &wants), vec![Some(2); 3]);
    }

    #[test]
    fn single_layer_track_is_all_or_nothing() {
        let l = [layer(800, 0, 0)];
        assert_eq!(allocate(1_000_000, &[want(&l)]), vec![Some(0)]);
        assert_eq!(allocate(700_000, &[want(&l)]), vec![Some(0)]);
        let mut w = want(&l);
        w.max_size = Some((100, 100));
        assert_eq!(allocate(1_000_000, &[w]), vec![Some(0)]);
    }

    #[test]
    fn unknown_sizes_do_not_block_a_size_cap() {
        let mut l = three();
        for x in &mut l {
            x.width = 0;
            x.height = 0;
        }
        let mut w = want(&l);
        w.max_size = Some((640, 360));
        // Unknown sizes count as large enough: the lowest layer serves the request.
        assert_eq!(size_cap(&l, w.max_size), Some(0));
        assert_eq!(size_cap(&l, None), Some(2));
    }

    #[test]
    fn switches_happen_on_a_keyframe_of_the_target() {
        // Nothing is sent before the first keyframe of the target.
        let f = forward(None, Some('h'), 'h', false);
        assert_eq!((f.send, f.current), (false, None));
        let f = forward(None, Some('h'), 'q', true);
        assert_eq!((f.send, f.current), (false, None));
        let f = forward(None, Some('h'), 'h', true);
        assert_eq!((f.send, f.current, f.switched), (true, Some('h'), true));
        // On h, target f: h continues until f's keyframe, then f and only f.
        let f = forward(Some('h'), Some('f'), 'h', false);
        assert_eq!((f.send, f.current), (true, Some('h')));
        let f = forward(Some('h'), Some('f'), 'f', false);
        assert_eq!((f.send, f.current), (false, Some('h')));
        let f = forward(Some('h'), Some('f'), 'f', true);
        assert_eq!((f.send, f.current, f.switched), (true, Some('f'), true));
        let f = forward(Some('f'), Some('f'), 'h', true);
        assert_eq!((f.send, f.current), (false, Some('f')));
        // Down works the same way (the lower layer's keyframe).
        let f = forward(Some('f'), Some('q'), 'f', false);
        assert_eq!((f.send, f.current), (true, Some('f')));
        let f = forward(Some('f'), Some('q'), 'q', true);
        assert_eq!((f.send, f.current, f.switched), (true, Some('q'), true));
        // Steady state: only the current layer, keyframes or not, no switch flag.
        let f = forward(Some('q'), Some('q'), 'q', true);
        assert_eq!((f.send, f.current, f.switched), (true, Some('q'), false));
    }

    #[test]
    fn no_target_stops_video_at_once() {
        for (layer, key) in [('h', true), ('h', false), ('q', true)] {
            let f = forward(Some('h'), None, layer, key);
            assert_eq!((f.send, f.current), (false, None));
        }
    }

    #[test]
    fn temporal_caps_apply_only_past_the_budget() {
        let l = three();
        let wants = [want(&l), want(&l), want(&l)];
        let chosen = allocate(300_000, &wants);
        // Two q layers fit in 300k, the third does not: it drops to its temporal base.
        assert_eq!(
            temporal_caps(300_000, &wants, &chosen),
            vec![None, None, Some(0)]
        );
        let chosen = allocate(10_000_000, &wants);
        assert_eq!(temporal_caps(10_000_000, &wants, &chosen), vec![None; 3]);
        // No video chosen: no cap needed.
        assert_eq!(temporal_caps(0, &wants[..1], &[None]), vec![None]);
    }

    #[test]
    fn temporal_layers_drop_at_once_and_come_back_on_a_sync_frame() {
        // Uncapped: everything passes.
        assert_eq!(
            temporal_forward(None, u8::MAX, 2, false, false),
            (true, u8::MAX)
        );
        // Capped to the base: TL1/TL2 dropped at once, TL0 kept.
        assert_eq!(
            temporal_forward(Some(0), u8::MAX, 2, false, false),
            (false, 0)
        );
        assert_eq!(temporal_forward(Some(0), 0, 1, true, false), (false, 0));
        assert_eq!(temporal_forward(Some(0), 0, 0, false, false), (true, 0));
        // Cap lifted: TL1 only from its next sync frame, TL2 likewise.
        assert_eq!(temporal_forward(None, 0, 1, false, false), (false, 0));
        assert_eq!(temporal_forward(None, 0, 1, true, false), (true, 1));
        assert_eq!(temporal_forward(None, 1, 1, false, false), (true, 1));
        assert_eq!(temporal_forward(None, 1, 2, false, false), (false, 1));
        assert_eq!(temporal_forward(None, 1, 2, true, false), (true, 2));
        // A keyframe resynchronizes every allowed layer.
        assert_eq!(temporal_forward(None, 0, 0, false, true), (true, u8::MAX));
        assert_eq!(temporal_forward(Some(1), 0, 0, false, true), (true, 1));
    }
}
