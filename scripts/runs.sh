# Shared by the table scripts (sourced, not run): how one run or one cohort is started, so that
# starting a script again skips finished runs and resumes interrupted ones. $CIFAR is the
# command (CIFAR=echo lists the runs' flags instead).

launch() {  # the command, or with CIFAR=echo its words shell-quoted on one line
  if [ "$CIFAR" = echo ]; then
    printf '%q ' "$@"
    echo
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
