"""Pure decision logic: schedules, thaw plans, decision rules and argument checks.

Nothing here imports torch or Lightning, so these modules import in milliseconds and are tested on
hand-made inputs.
"""
