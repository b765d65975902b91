"""Pure decision logic: schedules, thaw plans and decision rules.

Nothing here imports torch or Lightning, so these modules import in milliseconds and are tested on
hand-made inputs.
"""
