# Sourced by the dry-run stubs: appends "name argv..." to $STUB_LOG (one line per call).
printf '%s' "$(basename "$0")" >>"${STUB_LOG:-/dev/null}"
printf ' %q' "$@" >>"${STUB_LOG:-/dev/null}"
echo >>"${STUB_LOG:-/dev/null}"
