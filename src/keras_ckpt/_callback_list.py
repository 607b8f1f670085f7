"""The callbacks of the running `fit()`, seen from one of them.

Keras gives a callback no reference to the `CallbackList` it is in, yet
`Checkpoint` needs its siblings (the `TensorBoard` callback to write its
save-cost scalars to, stateful callbacks left out of `state=`). Both Keras 3
and tf_keras call each hook from a `CallbackList` method that loops over
`self.callbacks`, so the list is the caller's `self`. This is the one place
that relies on it; `tests/test_newcomer.py` fails if Keras changes it.
"""

import sys


def sibling_callbacks(callback, max_depth=8):
    """The callbacks of the `CallbackList` calling `callback`'s hook, or []."""
    frame = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            break
        owner = frame.f_locals.get("self")
        callbacks = getattr(owner, "callbacks", None)
        if isinstance(callbacks, list) and any(c is callback for c in callbacks):
            return list(callbacks)
        frame = frame.f_back
    return []
