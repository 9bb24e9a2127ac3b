"""The accrual engine: a faust-streaming worker that accrues Simple Earn interest."""
