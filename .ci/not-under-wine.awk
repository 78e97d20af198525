# Prints each test cfg'd out on Windows with the reason its source gives:
# a "// Unix only: ..." or "// Linux only: ..." comment (continued on the
# next comment lines) before the test function or the file's #![cfg].
FNR == 1 { why = "" }
/^[ \t]*\/\/ (Unix|Linux) only:/ { why = $0; sub(/^[ \t]*\/\/ /, "", why); next }
why != "" && /^[ \t]*\/\/ / { more = $0; sub(/^[ \t]*\/\/ /, "", more); why = why " " more; next }
why != "" && /^#!\[cfg/ { printf "  %s (every test): %s\n", FILENAME, why; why = ""; next }
why != "" && /fn [a-z_0-9]+/ { match($0, /fn [a-z_0-9]+/); printf "  %s %s: %s\n", FILENAME, substr($0, RSTART + 3, RLENGTH - 3), why; why = ""; next }
