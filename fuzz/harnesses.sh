# harnesses.sh — sourced by fuzz/fuzz.sh and fuzz/run-check: the harness names (FUZZ_NAMES in
# fuzz/Makefile.inc when make passes it, else this list) and max_len, each harness's largest
# input: a little over the largest seed of its format.
: "${FUZZ_NAMES:=wire connection cell safetensors hfconfig data peft gguf tokenizer bnb image hub trainer_state rewards}"
max_len() {
  case $1 in
    wire) echo 65536 ;; connection) echo 4096 ;; cell) echo 4096 ;; safetensors) echo 65536 ;;
    hfconfig) echo 16384 ;; data) echo 65536 ;; peft) echo 8192 ;; gguf) echo 16384 ;;
    tokenizer) echo 131072 ;; bnb) echo 65536 ;; image) echo 16384 ;;
    hub) echo 32768 ;; trainer_state) echo 8192 ;; rewards) echo 4096 ;; *) echo 65536 ;;
  esac
}
