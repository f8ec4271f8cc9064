"""The command-line flags of the transfer methods, shared by cifar.py and imagenet.py: for each
method its weight (`--<method>_beta`, 0: off) and then its own settings (`--<method>_<name>`).
What each term computes is in transfer.py, its formula in losses.py."""
import auxiliary
from transfer import DEFAULT_INIT_EPOCHS


def add_transfer_loss_arguments(p):
    p.add_argument('--at_p', default=2, type=float,
                   help='power p of the attention map sum_c |A_c|^p (the paper compares 1, 2, 4)')
    p.add_argument('--at_form', default='code', choices=['code', 'paper'],
                   help="code: beta * mean squared difference of the normalised maps (the reference "
                        "code's); paper: beta/2 * L2 norm of their difference per sample (eq. 2)")
    p.add_argument('--beta_decay', default=1, type=float,
                   help='multiply --beta by this at each --epoch_step (the AT+KD schedule)')
    p.add_argument('--grad_beta', default=0, type=float,
                   help='gradient-based AT: B/2 * ||J_s - J_t||_2 with J = dCE/d(input)')
    p.add_argument('--sym_beta', default=0, type=float,
                   help="flip symmetry: B/2 * ||J_s - flip(J_s)||_2 on the student's input gradient")
    p.add_argument('--factt_beta', default=0, type=float,
                   help="full-activation transfer: B * mean squared difference of the groups' outputs")
    p.add_argument('--fitnet_beta', default=0, type=float,
                   help="FitNets hint: B * MSE between a 3x3 regressor of the student's middle group "
                        "and the teacher's")
    p.add_argument('--cos_beta', default=0, type=float,
                   help="B * (1 - cosine) between the last groups' pooled features")
    p.add_argument('--aux_weight', default=0, type=float,
                   help='W * cross-entropy of auxiliary heads on groups 0 and 1 (training only)')
    add_benchmark_method_arguments(p)


def add_benchmark_method_arguments(p):
    """The other methods of the CRD benchmark (RepDistiller) and DKD (mdistiller): one weight
    each (0: off), then each method's own settings under its name."""
    p.add_argument('--sp_beta', default=0, type=float,
                   help="similarity-preserving KD: B * SP between the last groups' batch Gram matrices")
    p.add_argument('--fitnet_regressor', default='conv', choices=['conv', 'convreg'],
                   help="FitNets' regressor of the student's middle group: conv (a 3x3 conv) or convreg "
                        "(RepDistiller's hint ConvReg: conv, BN, ReLU, strided where the sizes differ)")
    p.add_argument('--cc_beta', default=0, type=float,
                   help='correlation congruence: B * CC between learned embeddings of the pooled features')
    p.add_argument('--cc_dim', default=128, type=int, help="size of CC's linear embeddings (RepDistiller's 128)")
    p.add_argument('--rkd_beta', default=0, type=float,
                   help='relational KD: B * RKD (distance and angle) between the pooled features')
    p.add_argument('--rkd_w_d', default=25, type=float, help="weight of RKD's distance term")
    p.add_argument('--rkd_w_a', default=50, type=float, help="weight of RKD's angle term")
    p.add_argument('--pkt_beta', default=0, type=float,
                   help='probabilistic knowledge transfer: B * PKT between the pooled features')
    p.add_argument('--nst_beta', default=0, type=float,
                   help='neuron selectivity transfer: B * NST (polynomial-kernel MMD) on each group')
    p.add_argument('--kdsvd_beta', default=0, type=float,
                   help="SVD distillation: B * KDSVD over consecutive groups' singular vectors")
    p.add_argument('--kdsvd_k', default=1, type=int, help='singular vectors KDSVD compares per group')
    p.add_argument('--fsp_beta', default=0, type=float,
                   help='flow of solution procedure: B * FSP between consecutive groups, trained in the init '
                        'stage (--init_epochs 0: a main-stage term)')
    p.add_argument('--vid_beta', default=0, type=float,
                   help="variational information distillation: B * VID on each group (learned regressors)")
    p.add_argument('--dkd_beta', default=0, type=float,
                   help='decoupled KD: B * (alpha TCKD + nckd NCKD) at --temperature, warmed up linearly')
    p.add_argument('--dkd_alpha', default=1, type=float, help="DKD's weight of target-class KD (its alpha)")
    p.add_argument('--dkd_nckd', default=8, type=float, help="DKD's weight of non-target-class KD (its beta)")
    p.add_argument('--dkd_warmup', default=20, type=int,
                   help='epochs over which the DKD weight rises linearly to --dkd_beta (0: none)')
    p.add_argument('--logit_stand', action='store_true',
                   help='standardise student and teacher logits (zero mean, unit std) before KD and DKD')
    p.add_argument('--kd_beta', default=0, type=float,
                   help='B * KD (T^2 KL at --temperature) as a term of its own, beside the cross-entropy '
                        '(needs --alpha 0); CRD+KD as RepDistiller weighs it: --kd_beta 1 --crd_beta 0.8')
    p.add_argument('--crd_beta', default=0, type=float,
                   help="contrastive representation distillation: B * CRD between the pooled features "
                        "(RepDistiller's weight: 0.8)")
    p.add_argument('--crd_feat_dim', default=128, type=int, help="size of CRD's embeddings")
    p.add_argument('--crd_nce_k', default=16384, type=int,
                   help='negatives per sample: training images of other classes, drawn at each step')
    p.add_argument('--crd_nce_t', default=0.07, type=float, help="temperature of CRD's scores")
    p.add_argument('--crd_nce_m', default=0.5, type=float, help="momentum of CRD's memory updates")
    p.add_argument('--reviewkd_beta', default=0, type=float,
                   help="knowledge review: B * HCL between the student's groups and pooled feature, fused by "
                        "learned ABF modules, and the teacher's pre-ReLU groups and pooled feature, warmed up "
                        "linearly (mdistiller's CIFAR-100 weight: 5)")
    p.add_argument('--reviewkd_warmup', default=20, type=int,
                   help='epochs over which the ReviewKD weight rises linearly to --reviewkd_beta (0: none)')
    p.add_argument('--reviewkd_mid_channels', default=auxiliary.REVIEWKD_MAX_MID_CHANNELS, type=int,
                   help="width of ReviewKD's fusion: at most this, at most the student's pooled feature's "
                        "channels (mdistiller's min(512, C))")
    p.add_argument('--ab_beta', default=0, type=float,
                   help="activation boundaries: B * AB between the student's pre-ReLU groups, through learned "
                        "connectors, and the teacher's, in the init stage only (RepDistiller's weight: 1)")
    p.add_argument('--ft_beta', default=0, type=float,
                   help="factor transfer: B * FT between a learned translator's factor of the student's last group "
                        "and the factor of the teacher's by a paraphraser, itself trained in the init stage to "
                        "reconstruct that group (RepDistiller's weight: 200)")
    p.add_argument('--ft_rate', default=0.5, type=float,
                   help="FT's factor channels per channel of the teacher's last group (RepDistiller's k: 0.5)")
    p.add_argument('--init_epochs', default=None, type=int,
                   help=f'epochs of the init stage that AB, FT and FSP train before the main stage (default: '
                        f'{DEFAULT_INIT_EPOCHS} with one of them, as RepDistiller, else 0; FSP with 0 is a '
                        f'main-stage term)')
    p.add_argument('--init_lr', default=None, type=float,
                   help='constant learning rate of the init stage (default: --lr; RepDistiller uses 0.01 for FT '
                        'with ResNet and WRN students)')
    p.add_argument('--ofd_beta', default=0, type=float,
                   help='overhaul of feature distillation: B * OFD between connected pre-ReLU groups '
                        "(mdistiller's weight: 1e-3, beside a cross-entropy of weight 1: --alpha 0)")
