// Every elementwise op's functor, one header per op (<op>.h beside its CUDA kernel <op>.cu).
#pragma once
#include "ddim.h"
#include "ddpm.h"
#include "q_sample.h"
#include "langevin.h"
#include "euler_step.h"
#include "heun_step.h"
#include "dpmpp_2m_step.h"
#include "flow_step.h"
#include "flow_q_sample.h"
#include "lcm_step.h"
#include "linear_step.h"
