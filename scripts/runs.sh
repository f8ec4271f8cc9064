# Shared by the table scripts (sourced, not run): how one run or one cohort is started, so that
# starting a script again skips finished runs and resumes interrupted ones. $CIFAR is the
# command (CIFAR=echo lists the runs' commands instead).

quoted() {  # one argument as a person would type it: bare where the shell leaves it alone, else in single quotes
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@+%-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

launch() {  # the command, or with CIFAR=echo the command a person can copy and run, on one line
  if [ "$CIFAR" = echo ]; then
    local words=(python3 cifar.py) arg
    for arg in "$@"; do
      words+=("$(quoted "$arg")")
    done
    echo "${words[*]}"
  else
    $CIFAR "$@"
  fi
}

single() {  # single DIR [cifar.py flags...]: one run; a started one resumes from its checkpoint
  local dir=$1; shift
  if [ -f "$dir/model.pt7" ]; then
    launch --save "$dir" --resume "$dir/model.pt7" "$@"
  else
    launch --save "$dir" "$@"
  fi
}

cohort() {  # cohort DIR MEMBERS [cifar.py flags...]: one cohort; a started one resumes
  local dir=$1 members=$2; shift 2
  if [ -d "$dir" ]; then
    launch --save "$dir" --resume "$dir" --cohort "$members" "$@"
  else
    launch --save "$dir" --cohort "$members" "$@"
  fi
}
