"""What wraps any optimizer and passes ``update``'s extra arguments (``value=``) on: iterate averaging, lookahead."""
